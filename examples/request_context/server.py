"""request_context: read Envoy's attributes, forwarded metadata and per-route settings.

What the callout learns about a request beyond its headers, through `CalloutContext`:

- ``context.attributes``: Envoy's request and response attributes (``request_attributes`` /
  ``response_attributes`` in the filter config) as plain values. The request gets
  ``x-client-address`` (``source.address``); the response gets ``x-request-path``
  (``request.path``, read again in the response phase) and ``x-upstream-status``
  (``response.code``; every attribute number is a float).
- ``context.metadata``: the namespaces Envoy forwards (``metadata_options``), as
  ``{namespace: {key: value}}``. The request gets ``x-tenant``: the ``tenant`` of the
  first forwarded namespace that has one (``-`` when none does).
- Per-route settings (``ExtProcPerRoute``): a route's ``grpc_initial_metadata`` reaches the
  callout as gRPC metadata; its ``x-route`` value is echoed as ``x-callout-route`` on the
  response (``default`` when the route sets none). A route whose override buffers the
  request body makes ``on_request_body`` run; it reads ``content-type`` from
  ``context.request_headers_map`` (headers stay readable on every phase) and the response
  gets ``x-request-body: <bytes> <content-type>``.

Envoy settings: ``request_attributes: [request.path, source.address]``,
``response_attributes: [response.code]``, ``metadata_options.forwarding_namespaces.untyped:
[calloutkit.test]``; routes as in docs/guide/examples/request_context.md.

Run it::

    calloutkit serve examples/request_context
"""

from __future__ import annotations

import dataclasses

from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HeadersResponse,
    HttpBody,
    HttpHeaders,
)

from calloutkit import CalloutContext, CalloutServer, add_header_mutation, nonblocking


@dataclasses.dataclass
class Seen:
    """What the request phases leave for the response phase."""

    route: str = "default"
    body: str = ""


def route_name(context: CalloutContext) -> str:
    """The ``x-route`` value a route's ``grpc_initial_metadata`` sent, else ``default``."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-route":
            return str(value)
    return "default"


class RequestContextServer(CalloutServer):
    """Reflects attributes, metadata and per-route settings in headers."""

    def new_state(self) -> Seen:
        return Seen()

    @nonblocking
    def on_request_headers(self, headers: HttpHeaders,
                           context: CalloutContext) -> HeadersResponse:
        context.state.route = route_name(context)
        tenant = next((values["tenant"] for _, values in sorted(context.metadata.items())
                       if "tenant" in values), "-")
        client = context.attributes.get("source.address", "-")
        return add_header_mutation(add=[("x-client-address", str(client)),
                                        ("x-tenant", str(tenant))])

    @nonblocking
    def on_request_body(self, body: HttpBody, context: CalloutContext) -> None:
        # The request headers came in an earlier message; the context still has them.
        content_type = context.request_headers_map.get("content-type", "-")
        context.state.body = f"{len(body.body)} {content_type}"

    @nonblocking
    def on_response_headers(self, headers: HttpHeaders,
                            context: CalloutContext) -> HeadersResponse:
        attributes = context.attributes  # the request's attributes and the response's
        seen: Seen = context.state
        add = [("x-request-path", str(attributes.get("request.path", "-"))),
               ("x-callout-route", seen.route)]
        if "response.code" in attributes:
            add.append(("x-upstream-status", str(int(attributes["response.code"]))))
        if seen.body:
            add.append(("x-request-body", seen.body))
        return add_header_mutation(add=add)
