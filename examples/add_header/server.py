"""add_header: add a header to every request (the upstream sees it) and every response.

The request gets ``header-request: request`` and loses ``foo``; the response gets
``header-response: response``. A value already there is kept and the new one added beside
it (``APPEND_IF_EXISTS_OR_ADD``); see ``update_header`` to replace it instead, which is
what Envoy does when no append action is given.

Envoy settings: request and response headers SEND (the defaults); no bodies needed.

Run it::

    calloutkit serve examples/add_header
"""

from __future__ import annotations

from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.service.ext_proc.v3.external_processor_pb2 import HeadersResponse, HttpHeaders

from calloutkit import CalloutContext, CalloutServer, add_header_mutation, nonblocking

APPEND = HeaderValueOption.APPEND_IF_EXISTS_OR_ADD


class AddHeaderServer(CalloutServer):
    """Adds one header each way and removes ``foo`` from the request."""

    @nonblocking  # builds a reply and nothing else: no need for the thread pool
    def on_request_headers(self, headers: HttpHeaders,
                           context: CalloutContext) -> HeadersResponse:
        return add_header_mutation(add=[("header-request", "request")], remove=["foo"],
                                   append_action=APPEND, clear_route_cache=True)

    @nonblocking
    def on_response_headers(self, headers: HttpHeaders,
                            context: CalloutContext) -> HeadersResponse:
        return add_header_mutation(add=[("header-response", "response")], append_action=APPEND)
