"""json_only_buffering: buffer and inspect JSON bodies only; let every other body stream past.

Envoy is configured with body mode NONE, so by default no body reaches the callout and
uploads of any size flow at full speed. When the request headers say
``content-type: application/json``, the server asks Envoy (with a mode override) to send
that request's body BUFFERED; the same on the response side. A JSON body then:

- request: must parse, or the client gets ``400`` and the upstream is never called;
- both ways: has the values of sensitive keys (``password``, ``token``, ``authorization``,
  ...) replaced by ``"[redacted]"`` at any depth; ``x-redacted`` lists the keys that were.

calloutkit sets the new ``content-length`` when the body changes size.

Envoy settings: ``request_body_mode: NONE``, ``response_body_mode: NONE``,
``allow_mode_override: true`` (without it Envoy ignores the override and no body arrives).

Run it::

    calloutkit serve examples/json_only_buffering
"""

from __future__ import annotations

import json
import logging
from typing import Any

from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyResponse,
    HttpBody,
    HttpHeaders,
    ImmediateResponse,
    ProcessingResponse,
)

from calloutkit import (
    CalloutContext,
    CalloutServer,
    add_body_mutation,
    get_header,
    header_immediate_response,
    nonblocking,
    override_mode,
)
from calloutkit.tools import header_mutation

logger = logging.getLogger(__name__)

SENSITIVE = frozenset({"password", "secret", "token", "access_token", "refresh_token",
                       "authorization", "api_key", "credit_card"})
REDACTED = "[redacted]"


def is_json(headers: HttpHeaders) -> bool:
    """True for ``application/json`` and ``application/<anything>+json``."""
    ctype = (get_header(headers, "content-type") or "").split(";")[0].strip().lower()
    return ctype == "application/json" or (ctype.startswith("application/")
                                           and ctype.endswith("+json"))


def redact(value: Any, found: set[str]) -> Any:
    """``value`` with sensitive keys' values replaced, at any depth; their names go in found."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if isinstance(key, str) and key.lower() in SENSITIVE:
                found.add(key)
                out[key] = REDACTED
            else:
                out[key] = redact(item, found)
        return out
    if isinstance(value, list):
        return [redact(item, found) for item in value]
    return value


def redacted_body(body: bytes) -> BodyResponse | None:
    """A body reply with the redacted JSON, or None when nothing is sensitive."""
    found: set[str] = set()
    cleaned = redact(json.loads(body), found)
    if not found:
        return None
    reply = add_body_mutation(body=json.dumps(cleaned, separators=(",", ":")))
    # In BUFFERED mode Envoy still holds the headers, so a body reply can change them too.
    reply.response.header_mutation.MergeFrom(
        header_mutation(add=[("x-redacted", ",".join(sorted(found)))]))
    return reply


class JsonOnlyBufferingServer(CalloutServer):
    """Buffers JSON bodies (both ways) to redact them; other bodies never reach it."""

    @nonblocking
    def on_request_headers(self, headers: HttpHeaders,
                           context: CalloutContext) -> ProcessingResponse | None:
        if headers.end_of_stream or not is_json(headers):
            return None
        return override_mode(context, request_body_mode="BUFFERED")

    @nonblocking
    def on_response_headers(self, headers: HttpHeaders,
                            context: CalloutContext) -> ProcessingResponse | None:
        if headers.end_of_stream or not is_json(headers):
            return None
        return override_mode(context, response_body_mode="BUFFERED")

    def on_request_body(self, body: HttpBody,
                        context: CalloutContext) -> BodyResponse | ImmediateResponse | None:
        try:
            return redacted_body(body.body)
        except ValueError:  # json.JSONDecodeError and bad UTF-8 alike
            return header_immediate_response(
                400, headers=[("content-type", "application/json")],
                body='{"error": "request body is not valid JSON"}\n',
                details="calloutkit_invalid_json")

    def on_response_body(self, body: HttpBody, context: CalloutContext) -> BodyResponse | None:
        try:
            return redacted_body(body.body)
        except ValueError:
            logger.warning("upstream sent invalid JSON; passing it on unchanged")
            return None
