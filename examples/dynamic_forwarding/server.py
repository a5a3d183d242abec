"""dynamic_forwarding: pick the upstream endpoint per request, from a request header.

The client names a backend in ``x-backend`` (a name such as ``blue``, or one of the known
``ip:port`` endpoints). The callout answers the request headers with dynamic metadata in the
namespace ``com.google.envoy.dynamic_forwarding.selected_endpoints``:
``{"primary": "<ip>:<port>"}``. An unknown or missing backend selects the fallback endpoint,
never an address the client made up.

The backends come from the ``backends`` argument or ``DYNAMIC_FORWARDING_BACKENDS``
(``name=ip:port,...``); the fallback from ``fallback`` or ``DYNAMIC_FORWARDING_FALLBACK``.

Envoy settings:

- ``metadata_options.receiving_namespaces.untyped:
  [com.google.envoy.dynamic_forwarding.selected_endpoints]`` (Envoy drops the metadata
  otherwise);
- on the upstream cluster, the ``envoy.load_balancing_policies.override_host`` policy reading
  that namespace's ``primary`` key (docs/guide/examples/dynamic_forwarding.md has the YAML).
  Google Cloud load balancers with dynamic forwarding read the same metadata.

Run it::

    DYNAMIC_FORWARDING_BACKENDS=blue=10.1.10.2:80,green=10.1.10.3:80 \\
    DYNAMIC_FORWARDING_FALLBACK=10.1.10.4:80 calloutkit serve examples/dynamic_forwarding
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from envoy.service.ext_proc.v3.external_processor_pb2 import HttpHeaders, ProcessingResponse

from calloutkit import (
    CalloutContext,
    CalloutServer,
    ConfigError,
    add_dynamic_metadata,
    build_dynamic_forwarding_metadata,
    get_header,
    nonblocking,
)

logger = logging.getLogger(__name__)

DEFAULT_BACKENDS = "blue=10.1.10.2:80,green=10.1.10.3:80"
DEFAULT_FALLBACK = "10.1.10.4:80"


def parse_endpoint(text: str) -> tuple[str, int]:
    """``"10.0.0.1:80"`` -> ``("10.0.0.1", 80)``; raises `ConfigError` on anything else."""
    host, _, port = text.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"dynamic_forwarding: {text!r} is not ip:port")
    return host.strip("[]"), int(port)


def parse_backends(text: str) -> dict[str, tuple[str, int]]:
    """``"blue=10.0.0.1:80,green=10.0.0.2:80"`` -> ``{"blue": ("10.0.0.1", 80), ...}``."""
    backends = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, endpoint = item.partition("=")
        if not sep:
            raise ConfigError(f"dynamic_forwarding: backend {item!r} is not name=ip:port")
        backends[name.strip()] = parse_endpoint(endpoint)
    return backends


class DynamicForwardingServer(CalloutServer):
    """Selects the endpoint named by ``x-backend``, or the fallback."""

    def __init__(self, *args: Any, backends: Mapping[str, str] | None = None,
                 fallback: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if backends is None:
            self.backends = parse_backends(
                os.environ.get("DYNAMIC_FORWARDING_BACKENDS", DEFAULT_BACKENDS))
        else:
            self.backends = {name: parse_endpoint(ep) for name, ep in backends.items()}
        self.fallback = parse_endpoint(
            fallback or os.environ.get("DYNAMIC_FORWARDING_FALLBACK", DEFAULT_FALLBACK))
        # a client may also name a known endpoint directly, as "ip:port"
        self.by_address = {f"{ip}:{port}": (ip, port) for ip, port in self.backends.values()}

    def select(self, wanted: str | None) -> tuple[str, int]:
        """The endpoint for an ``x-backend`` value; the fallback for anything unknown."""
        if wanted is None:
            return self.fallback
        return self.backends.get(wanted) or self.by_address.get(wanted) or self.fallback

    @nonblocking
    def on_request_headers(self, headers: HttpHeaders,
                           context: CalloutContext) -> ProcessingResponse:
        ip, port = self.select(get_header(headers, "x-backend"))
        logger.debug("selected endpoint %s:%d", ip, port)
        return add_dynamic_metadata(context, None, build_dynamic_forwarding_metadata(ip, port))
