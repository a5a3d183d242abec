"""add_body: append to the request body, replace the response body.

The upstream receives the client's body followed by ``-added-body``; the client receives
``new-body`` whatever the upstream answered. calloutkit sets the new ``content-length`` in
both directions, which Envoy requires in BUFFERED mode (it answers 500 otherwise).

In STREAMED mode the same server appends only once, to the last chunk.

Envoy settings: ``request_body_mode: BUFFERED`` and ``response_body_mode: BUFFERED``.

Run it::

    calloutkit serve examples/add_body
"""

from __future__ import annotations

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import BodyResponse, HttpBody

from calloutkit import CalloutContext, CalloutServer, add_body_mutation, nonblocking

SUFFIX = b"-added-body"


def whole_or_last(body: HttpBody, mode: int) -> bool:
    """True for a BUFFERED body (complete even when trailers follow) or a last chunk."""
    return mode == ProcessingMode.BUFFERED or bool(body.end_of_stream)


class AddBodyServer(CalloutServer):
    """Appends ``-added-body`` to request bodies and replaces response bodies."""

    @nonblocking
    def on_request_body(self, body: HttpBody, context: CalloutContext) -> BodyResponse | None:
        if not whole_or_last(body, context.request_body_mode):
            return None  # a STREAMED chunk before the last one: pass it through unchanged
        return add_body_mutation(body=body.body + SUFFIX)

    @nonblocking
    def on_response_body(self, body: HttpBody, context: CalloutContext) -> BodyResponse | None:
        if not whole_or_last(body, context.response_body_mode):
            # drop earlier chunks; the last one carries the new body
            return add_body_mutation(clear_body=True)
        return add_body_mutation(body="new-body")
