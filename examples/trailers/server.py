"""trailers: read and add HTTP trailers, with a digest computed over the streamed body.

Request: the body streams through (STREAMED) while the server hashes it. If the client sends
an ``x-content-sha256`` trailer, the server compares it with the digest and adds the trailer
``x-content-verified: true`` or ``false`` for the upstream.

Response: the server hashes the body the same way. If the upstream's response ends with
trailers, the server adds ``x-body-sha256: <hex digest>`` and removes ``x-internal-*`` ones.

Trailers can only be changed where they exist: Envoy sends a trailers message only when the
client (or the upstream) sent trailers. HTTP/1.1 trailers need ``enable_trailers: true`` in
Envoy's ``http_protocol_options``, on the listener and on the upstream cluster.

Envoy settings: ``request_body_mode: STREAMED``, ``response_body_mode: STREAMED``,
``request_trailer_mode: SEND``, ``response_trailer_mode: SEND``.

Run it::

    calloutkit serve examples/trailers
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from typing import Any

from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpTrailers,
    TrailersResponse,
)

from calloutkit import CalloutContext, CalloutServer, add_trailer_mutation, get_header, nonblocking


@dataclasses.dataclass
class Digests:
    """Per-stream state: a running SHA-256 for each direction."""

    request: Any = dataclasses.field(default_factory=hashlib.sha256)
    response: Any = dataclasses.field(default_factory=hashlib.sha256)


class TrailersServer(CalloutServer):
    """Verifies the client's body digest trailer; adds one to the response."""

    def new_state(self) -> Digests:
        return Digests()

    @nonblocking
    def on_request_body(self, body: HttpBody, context: CalloutContext) -> None:
        context.state.request.update(body.body)  # None: the chunk goes on unchanged

    @nonblocking
    def on_response_body(self, body: HttpBody, context: CalloutContext) -> None:
        context.state.response.update(body.body)

    @nonblocking
    def on_request_trailers(self, trailers: HttpTrailers,
                            context: CalloutContext) -> TrailersResponse | None:
        claimed = get_header(trailers, "x-content-sha256")
        if claimed is None:
            return None
        actual = context.state.request.hexdigest()
        verified = hmac.compare_digest(claimed.strip().lower(), actual)
        return add_trailer_mutation(add=[("x-content-verified", str(verified).lower())])

    @nonblocking
    def on_response_trailers(self, trailers: HttpTrailers,
                             context: CalloutContext) -> TrailersResponse:
        internal = [h.key for h in trailers.trailers.headers if h.key.startswith("x-internal-")]
        return add_trailer_mutation(add=[("x-body-sha256", context.state.response.hexdigest())],
                                    remove=internal)
