"""redirect: answer every request with a 301 to the same path on a canonical site.

The client gets ``301 Moved Permanently`` with ``location: <REDIRECT_TO><path>?<query>``;
the upstream is never called. ``REDIRECT_TO`` (environment, or the ``redirect_to`` argument)
defaults to ``https://www.calloutkit.example``.

Envoy settings: request headers SEND (the default).

Run it::

    REDIRECT_TO=https://www.example.com calloutkit serve examples/redirect
"""

from __future__ import annotations

import os
from typing import Any

from envoy.service.ext_proc.v3.external_processor_pb2 import HttpHeaders, ImmediateResponse

from calloutkit import (
    CalloutContext,
    CalloutServer,
    ConfigError,
    get_header,
    header_immediate_response,
    nonblocking,
)


class RedirectServer(CalloutServer):
    """Permanently redirects every request to ``redirect_to`` + the original path."""

    def __init__(self, *args: Any, redirect_to: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        target = redirect_to or os.environ.get("REDIRECT_TO", "https://www.calloutkit.example")
        if not target.startswith(("http://", "https://")):
            raise ConfigError(f"REDIRECT_TO must be an http(s) URL, got {target!r}")
        self.redirect_to = target.rstrip("/")

    @nonblocking
    def on_request_headers(self, headers: HttpHeaders,
                           context: CalloutContext) -> ImmediateResponse:
        location = self.redirect_to + (get_header(headers, ":path") or "/")
        return header_immediate_response(
            301, headers=[("location", location), ("content-type", "text/plain")],
            body=f"moved to {location}\n", details="calloutkit_redirect")
