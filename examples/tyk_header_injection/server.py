"""Inject headers: a correlation ID before auth, the key's tenant after it.

- ``AddCorrelationId`` (Pre): gives every request an ``X-Request-Id`` (keeping the client's),
  tells the upstream which API it came through, and drops a header clients must not send.
- ``ForwardKeyMetadata`` (PostKeyAuth): copies the authenticated key's ``tenant`` and ``plan``
  metadata into headers, and removes the key itself (``Authorization`` and an ``api_key``
  query parameter) so the upstream never sees it.

The gateway applies headers from ``set_headers``/``delete_headers`` and the query from
``add_params``/``delete_params``; the helpers write exactly those. In the API definition::

    "custom_middleware": {"pre": [{"name": "AddCorrelationId"}],
                          "post_key_auth": [{"name": "ForwardKeyMetadata"}], "driver": "grpc"}

Try it::

    calloutkit serve examples/tyk_header_injection
    calloutkit tyk dispatch --hook pre --name AddCorrelationId --api-id pets --url /pets
"""

from __future__ import annotations

import uuid

from calloutkit import nonblocking
from calloutkit.tyk import Hook, Plugin, PluginCall, TykPluginServer


@nonblocking  # builds a reply and returns: no need for a thread
def add_correlation_id(call: PluginCall) -> None:
    if "X-Request-Id" not in call.request.headers:
        call.request.set_header("X-Request-Id", str(uuid.uuid4()))
    call.request.set_header("X-Api-Id", call.api_id)
    call.request.delete_header("X-Internal-Debug")


@nonblocking
def forward_key_metadata(call: PluginCall) -> None:
    # In PostKeyAuth and Post hooks Object.metadata is the key's session metadata.
    for field, header in (("tenant", "X-Tenant"), ("plan", "X-Plan")):
        if call.metadata.get(field):
            call.request.set_header(header, call.metadata[field])
    call.request.delete_header("Authorization")
    if "api_key" in call.request.params:
        call.request.delete_param("api_key")


class HeaderInjection(TykPluginServer):
    plugins = [
        Plugin("AddCorrelationId", add_correlation_id, hook=Hook.PRE),
        Plugin("ForwardKeyMetadata", forward_key_metadata, hook=Hook.POST_KEY_AUTH),
    ]


if __name__ == "__main__":
    HeaderInjection().run()
