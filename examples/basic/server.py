"""basic: one callback per phase, each doing the most common thing for its phase.

- request headers: rewrite ``:authority`` and ``:path``, add ``header-request``, remove ``foo``,
  and clear the route cache so Envoy routes on the new values;
- response headers: add ``hello: calloutkit``;
- request body: replace it with ``replaced-body``;
- response body: clear it.

Envoy settings: BUFFERED request and response bodies, and
``mutation_rules: {allow_all_routing: true}`` (without it Envoy ignores the ``:authority``
rewrite). calloutkit fixes ``content-length`` for the changed bodies.

Run it::

    calloutkit serve examples/basic

Try it without Envoy (see docs/guide/send.md)::

    calloutkit send examples/basic/stream.yaml
"""

from __future__ import annotations

import logging

from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyResponse,
    HeadersResponse,
    HttpBody,
    HttpHeaders,
)

from calloutkit import CalloutContext, CalloutServer, add_body_mutation, add_header_mutation

logger = logging.getLogger(__name__)


class BasicServer(CalloutServer):
    """Touches every phase once: headers both ways, bodies both ways."""

    def on_request_headers(self, headers: HttpHeaders,
                           context: CalloutContext) -> HeadersResponse:
        logger.debug("request headers: %s", headers)
        return add_header_mutation(
            add=[(":authority", "service.calloutkit.example"),
                 (":path", "/"),
                 ("header-request", "request")],
            remove=["foo"],
            clear_route_cache=True)

    def on_response_headers(self, headers: HttpHeaders,
                            context: CalloutContext) -> HeadersResponse:
        return add_header_mutation(add=[("hello", "calloutkit")])

    def on_request_body(self, body: HttpBody, context: CalloutContext) -> BodyResponse:
        return add_body_mutation(body="replaced-body")

    def on_response_body(self, body: HttpBody, context: CalloutContext) -> BodyResponse:
        return add_body_mutation(clear_body=True)
