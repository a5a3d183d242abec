"""metadata: read the metadata Envoy forwards and reflect it in a header.

Envoy sends the namespaces listed in ``metadata_options.forwarding_namespaces`` in every
message's ``metadata_context`` (as protobuf Structs); ``context.metadata`` gives them as
plain Python. This server turns them into compact
JSON and sets it as ``x-forwarded-metadata`` on the request (the upstream sees it) and on the
response (the client sees it). Without forwarded metadata, it sets ``x-forwarded-metadata: {}``.
(Not ``x-envoy-...``: Envoy ignores a callout's changes to ``x-envoy-*`` headers.)

Numbers arrive as doubles (Structs have no integers): ``tier: 3`` reads back as ``3.0``,
and this server writes whole numbers back as integers.

Envoy settings: ``metadata_options.forwarding_namespaces.untyped: [<namespace>, ...]``, and
something that sets metadata before the ext_proc filter (a ``set_metadata`` filter, a JWT
filter, ...).

Run it::

    calloutkit serve examples/metadata
"""

from __future__ import annotations

import json
from typing import Any

from envoy.service.ext_proc.v3.external_processor_pb2 import HeadersResponse, HttpHeaders

from calloutkit import CalloutContext, CalloutServer, add_header_mutation, nonblocking


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def forwarded_metadata(context: CalloutContext) -> dict[str, Any]:
    """``{namespace: values}`` from the message being handled."""
    return {namespace: _whole_numbers(values)
            for namespace, values in sorted(context.metadata.items())}


def metadata_header(context: CalloutContext) -> HeadersResponse:
    value = json.dumps(forwarded_metadata(context), sort_keys=True, separators=(",", ":"))
    return add_header_mutation(add=[("x-forwarded-metadata", value)])


class MetadataServer(CalloutServer):
    """Copies forwarded metadata into ``x-forwarded-metadata`` both ways."""

    @nonblocking
    def on_request_headers(self, headers: HttpHeaders,
                           context: CalloutContext) -> HeadersResponse:
        return metadata_header(context)

    @nonblocking
    def on_response_headers(self, headers: HttpHeaders,
                            context: CalloutContext) -> HeadersResponse:
        # metadata_context comes with every message, not only the first
        return metadata_header(context)
