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

from .._exceptions import ConfigError
from ._tyk import DISPATCH, DISPATCH_EVENT

BALANCING = ("round_robin", "least_outstanding")


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """TLS towards a backend: CA to trust, optional client certificate, name to verify."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str | None = None


@dataclasses.dataclass(frozen=True)
class HealthCheckConfig:
    """Active ``grpc.health.v1`` checks of every target of a backend."""

    interval: float = 5.0
    timeout: float = 1.0
    service: str = ""
    unhealthy_threshold: int = 1
    healthy_threshold: int = 1


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """A pool of equivalent plugin servers."""

    name: str
    targets: tuple[str, ...]
    balancing: str = "round_robin"
    tls: TlsConfig | None = None
    health_check: HealthCheckConfig | None = None
    eject_for: float = 10.0


@dataclasses.dataclass(frozen=True)
class TykMatch:
    """Conditions on a Tyk call (each None = any); values within one condition are OR-ed."""

    api_id: frozenset[str] | None = None
    org_id: frozenset[str] | None = None
    hook_name: frozenset[str] | None = None
    hook_type: frozenset[int] | None = None
    request_method: frozenset[str] | None = None
    path_prefix: tuple[str, ...] | None = None
    handler_name: frozenset[str] | None = None

    def methods(self) -> tuple[str, ...]:
        """The Tyk methods these conditions can apply to."""
        object_only = (self.hook_name, self.hook_type, self.request_method, self.path_prefix)
        if self.handler_name is not None:
            return (DISPATCH_EVENT,)
        if any(c is not None for c in object_only):
            return (DISPATCH,)
        return (DISPATCH, DISPATCH_EVENT)


@dataclasses.dataclass(frozen=True)
class RouteConfig:
    """One route: conditions (all must hold), a backend, mirrors and a timeout."""

    name: str
    backend: str
    methods: tuple[str, ...] | None = None       # "/pkg.Svc/Method", "/pkg.Svc/*" or "*"
    metadata: tuple[tuple[str, frozenset[str]], ...] = ()
    tyk: TykMatch | None = None
    mirrors: tuple[str, ...] = ()
    timeout: float | None = None
    line: int = 0

    def applies_to(self, method: str) -> bool:
        """Whether the method conditions admit ``method`` (the others need the call)."""
        patterns = self.methods
        if patterns is None:
            patterns = self.tyk.methods() if self.tyk is not None else ("*",)
        for pattern in patterns:
            if pattern == "*" or pattern == method or (
                    pattern.endswith("/*") and method.startswith(pattern[:-1])):
                return self.tyk is None or method in (DISPATCH, DISPATCH_EVENT)
        return False


@dataclasses.dataclass(frozen=True)
class MirroringConfig:
    """Limits for mirrored calls (see `MirrorPolicy`)."""

    timeout: float | None = 30.0
    max_in_flight: int = 100
    queue_size: int = 16


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
        from ._validate import read

        return read(text, path)
