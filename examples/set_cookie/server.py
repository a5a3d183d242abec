"""set_cookie: add a Set-Cookie to the response, only for clients that asked for it.

When the *request* carried a ``cookie-check`` header, the response gets
``set-cookie: calloutkit_session=...; Max-Age=3600; Path=/; HttpOnly; Secure; SameSite=Lax``.
The request headers are read from ``context.request_headers``: the context lives for the
whole stream, so the response phase can see what the request phase saw.

The cookie is *appended*: a ``Set-Cookie`` the upstream sent stays, as each cookie needs its
own header line.

Envoy settings: request and response headers SEND (the defaults).

Run it::

    calloutkit serve examples/set_cookie
"""

from __future__ import annotations

import secrets

from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.service.ext_proc.v3.external_processor_pb2 import HeadersResponse, HttpHeaders

from calloutkit import (
    CalloutContext,
    CalloutServer,
    add_header_mutation,
    headers_contain,
    nonblocking,
)

COOKIE_ATTRIBUTES = "Max-Age=3600; Path=/; HttpOnly; Secure; SameSite=Lax"


class SetCookieServer(CalloutServer):
    """Sets a session cookie on responses to requests that carry ``cookie-check``."""

    @nonblocking
    def on_response_headers(self, headers: HttpHeaders,
                            context: CalloutContext) -> HeadersResponse | None:
        request = context.request_headers
        if request is None or not headers_contain(request, "cookie-check"):
            return None
        cookie = f"calloutkit_session={secrets.token_urlsafe(16)}; {COOKIE_ATTRIBUTES}"
        return add_header_mutation(
            add=[("set-cookie", cookie)],
            append_action=HeaderValueOption.APPEND_IF_EXISTS_OR_ADD)
