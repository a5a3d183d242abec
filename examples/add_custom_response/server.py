"""add_custom_response: deny bad requests with a real 403, answer "mock" requests with canned data.

Request headers:
  - ``bad-header`` present: the client gets ``403`` with a short body, the upstream is never
    called;
  - ``mock`` present: the request goes on with the canned header ``mock-response: mocked-value``;
  - otherwise: ``header-request: request`` is added.

Request body (and response body, by the same rules):
  - contains ``bad-body``: ``403``;
  - contains ``mock``: replaced by ``mocked-body``;
  - otherwise: ``-added-body`` is appended (request) / the body becomes ``new-body`` (response).

A deny is an `ImmediateResponse`: Envoy answers the client itself with that status, headers
and body (``details`` shows up as ``%RESPONSE_CODE_DETAILS%`` in the access log). Ending the
gRPC stream with an error instead would give the client a bare 500 (see docs/guide/immediate.md).

Envoy settings: request and response bodies BUFFERED.

Run it::

    calloutkit serve examples/add_custom_response
"""

from __future__ import annotations

from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyResponse,
    HeadersResponse,
    HttpBody,
    HttpHeaders,
    ImmediateResponse,
)

from calloutkit import (
    CalloutContext,
    CalloutServer,
    add_body_mutation,
    add_header_mutation,
    body_contains,
    header_immediate_response,
    headers_contain,
    nonblocking,
)


def deny(reason: str) -> ImmediateResponse:
    """A 403 the client sees as is."""
    return header_immediate_response(
        403, headers=[("content-type", "text/plain")], body=f"denied: {reason}\n",
        details=f"calloutkit_denied_{reason.replace(' ', '_')}")


class CustomResponseServer(CalloutServer):
    """Denies on ``bad-header`` / ``bad-body``; mocks on ``mock``; otherwise mutates normally."""

    @nonblocking
    def on_request_headers(self, headers: HttpHeaders,
                           context: CalloutContext) -> HeadersResponse | ImmediateResponse:
        if headers_contain(headers, "bad-header"):
            return deny("bad header")
        if headers_contain(headers, "mock"):
            return add_header_mutation(add=[("mock-response", "mocked-value")])
        return add_header_mutation(add=[("header-request", "request")])

    @nonblocking
    def on_response_headers(self, headers: HttpHeaders,
                            context: CalloutContext) -> HeadersResponse:
        return add_header_mutation(add=[("header-response", "response")])

    @nonblocking
    def on_request_body(self, body: HttpBody,
                        context: CalloutContext) -> BodyResponse | ImmediateResponse:
        if body_contains(body, "bad-body"):
            return deny("bad body")
        if body_contains(body, "mock"):
            return add_body_mutation(body="mocked-body")
        return add_body_mutation(body=body.body + b"-added-body")

    @nonblocking
    def on_response_body(self, body: HttpBody,
                         context: CalloutContext) -> BodyResponse | ImmediateResponse:
        if body_contains(body, "bad-body"):
            return deny("bad body")  # the upstream's answer is held back; the client gets 403
        if body_contains(body, "mock"):
            return add_body_mutation(body="mocked-body")
        return add_body_mutation(body="new-body")
