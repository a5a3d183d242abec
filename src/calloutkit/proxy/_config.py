"""The sections of a routing file, each a frozen dataclass: backends, their TLS and health
checks, routes and their Tyk conditions, mirroring.

`RoutingConfig` (in `_routes`) holds them together; `_validate` builds them from YAML.
"""

from __future__ import annotations

import dataclasses

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
class SecurityConfig:
    """What the proxy reveals and whom it believes (the routing file's ``security`` section).

    ``expose_errors``: the proxy's own error statuses carry addresses and exception text
    (otherwise a short fixed text, the detail only in the log). ``forward_reflection``:
    ``grpc.reflection.*`` calls are routed like any other (otherwise UNIMPLEMENTED).
    ``trusted_metadata``: None believes every peer's metadata; an empty tuple none; otherwise
    only peers in these networks (or ``unix``) can meet a route's ``metadata`` condition.
    """

    expose_errors: bool = False
    forward_reflection: bool = False
    trusted_metadata: tuple[str, ...] | None = None
