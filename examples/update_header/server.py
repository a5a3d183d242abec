"""update_header: overwrite a header if it exists, add it if it does not.

``header-request`` on the request and ``header-response`` on the response end up with exactly
one value, whatever the client or the upstream sent: the mutation says
``OVERWRITE_IF_EXISTS_OR_ADD``. (Envoy also replaces when no action is given; saying it keeps
the intent explicit, and holds on gateways that default to appending.)

Envoy settings: request and response headers SEND (the defaults).

Run it::

    calloutkit serve examples/update_header
"""

from __future__ import annotations

from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.service.ext_proc.v3.external_processor_pb2 import HeadersResponse, HttpHeaders

from calloutkit import CalloutContext, CalloutServer, add_header_mutation, nonblocking

OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


class UpdateHeaderServer(CalloutServer):
    """Sets one header each way, replacing any value already there."""

    @nonblocking
    def on_request_headers(self, headers: HttpHeaders,
                           context: CalloutContext) -> HeadersResponse:
        return add_header_mutation(add=[("header-request", "request-new-value")],
                                   append_action=OVERWRITE, clear_route_cache=True)

    @nonblocking
    def on_response_headers(self, headers: HttpHeaders,
                            context: CalloutContext) -> HeadersResponse:
        return add_header_mutation(add=[("header-response", "response-new-value")],
                                   append_action=OVERWRITE)
