"""The routing file: listeners, backends, routes, a default route, mirroring.

`RoutingConfig.load` reads and validates the whole YAML file once; every error names the file,
the line, the key and what is wrong, e.g.
``routes.yaml:14: routes[1].match.tyk.hook_type: 'Pree' is not one of Pre, Post, ...``.
Certificate files are read at load time, relative to the routing file's folder.

A complete file::

    listeners:                        # the server options, as on the command line
      plaintext_address: 0.0.0.0:5555
      health_check_address: 0.0.0.0:8000
    unary_methods:                    # the fast path (default: Tyk's two methods, ext_authz)
      - /coprocess.Dispatcher/Dispatch
      - /coprocess.Dispatcher/DispatchEvent
    mirroring: {timeout: 5s, max_in_flight: 100, queue_size: 16}
    security:                         # all off by default; see docs/proxy.md, threat model
      expose_errors: false            # the proxy's own errors name no address, no exception
      forward_reflection: false       # grpc.reflection.* calls get UNIMPLEMENTED
      trusted_metadata: [10.0.0.0/8]  # only these peers' metadata can route (default: any)
    backends:
      team-a:
        targets: [10.0.0.5:5555, 10.0.0.6:5555]
        balancing: least_outstanding      # or round_robin (default)
        tls: {ca: ca.pem, cert: client.pem, key: client.key, server_name: plugins.internal}
        health_check: {interval: 5s, timeout: 1s, service: ""}
        eject_for: 10s                    # passive ejection after UNAVAILABLE (0 = off)
      team-a-next: {targets: [10.0.0.7:5555]}
      everyone: {targets: [10.0.0.9:5555]}
    routes:
      - name: team-a
        match:
          tyk: {api_id: [api-1, api-2]}   # Dispatch by spec.APIID, DispatchEvent by payload
        backend: team-a
        mirrors: [team-a-next]            # shadow traffic, responses discarded
        timeout: 2s
      - match:
          method: /envoy.service.ext_proc.v3.ExternalProcessor/Process
          metadata: {x-callout: images}
        backend: everyone
    default: everyone                     # or {backend: ..., mirrors: [...], timeout: ...}
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from ..runtime._errors import ConfigError
from ._config import BackendConfig, MirroringConfig, RouteConfig, SecurityConfig
from ._validate import read


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    """A validated routing file.

    Example::

        config = RoutingConfig.load("routes.yaml")
        print([route.name for route in config.routes], config.default)
    """

    path: str
    listeners: Mapping[str, Any]
    backends: Mapping[str, BackendConfig]
    routes: tuple[RouteConfig, ...]
    default: RouteConfig | None
    unary_methods: frozenset[str]
    mirroring: MirroringConfig
    security: SecurityConfig = dataclasses.field(default_factory=SecurityConfig)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RoutingConfig:
        """Read and validate ``path``; raises `ConfigError` naming file, line and key."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise ConfigError(f"cannot read routing file {path!r}: "
                              f"{exc.strerror or exc}") from None
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, path: str = "<routes>") -> RoutingConfig:
        """Validate routing YAML held in ``text`` (``path`` names it in errors)."""
        return cls(**read(text, path))
