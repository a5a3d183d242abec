"""The director of a routing file: the first route whose conditions all hold wins.

Conditions are cheap first: the method (routes that cannot apply are filtered once per
method), then metadata, and only then the peeked request, decoded once per call and only for
routes that ask for Tyk fields. No route matches -> the default route, or UNIMPLEMENTED.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

from ..runtime._config import DEFAULT_MAX_MESSAGE_SIZE
from ._backends import Backend, Target
from ._config import RouteConfig, SecurityConfig, TykMatch
from ._director import Destination, MirrorPolicy, StreamParameters
from ._mirror import error_code
from ._peeker import Peeker
from ._routes import RoutingConfig
from ._trust import MetadataTrust
from ._tyk import DISPATCH, TykView, event_view, object_view

logger = logging.getLogger(__name__)

_CACHE_LIMIT = 1024


def tyk_matches(match: TykMatch, view: TykView) -> bool:
    """Whether every condition of ``match`` holds for ``view``."""
    if match.api_id is not None and view.api_id not in match.api_id:
        return False
    if match.org_id is not None and view.org_id not in match.org_id:
        return False
    if match.handler_name is not None and (not view.is_event
                                           or view.handler_name not in match.handler_name):
        return False
    if view.is_event:
        # The other conditions describe Dispatch calls; an event never meets them.
        return all(c is None for c in (match.hook_name, match.hook_type, match.request_method,
                                        match.path_prefix))
    if match.hook_name is not None and view.hook_name not in match.hook_name:
        return False
    if match.hook_type is not None and view.hook_type not in match.hook_type:
        return False
    if match.request_method is not None and view.request_method.upper() not in \
            match.request_method:
        return False
    return match.path_prefix is None or any(view.path.startswith(p) for p in match.path_prefix)


class _MirrorReport:
    """`Destination.err_handler` of a mirror: log the first failure and then every 100th."""

    __slots__ = ("backend", "failures", "route")

    def __init__(self, route: str, backend: str) -> None:
        self.route = route
        self.backend = backend
        self.failures = 0

    def __call__(self, error: BaseException) -> BaseException:
        self.failures += 1
        if self.failures == 1 or self.failures % 100 == 0:
            logger.warning("route %s: mirror %s failed (%d so far): %s: %s", self.route,
                           self.backend, self.failures, error_code(error).name, error)
        return error


class Router:
    """Routes calls as a `RoutingConfig` says; a director for `TransparentHandler`.

    Build it inside the running event loop (it opens the backends' channels).

    Example::

        router = Router(RoutingConfig.load("routes.yaml"))
        handler = TransparentHandler(router, unary_methods=router.config.unary_methods)
    """

    def __init__(self, config: RoutingConfig, *, mirror: MirrorPolicy | None = None,
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 reuse: Mapping[str, Backend] | None = None,
                 security: SecurityConfig | None = None) -> None:
        self.config = config
        #: The file's ``security`` section, or what the proxy's options made of it.
        self.security = security if security is not None else config.security
        self._trust = MetadataTrust(self.security.trusted_metadata)
        self.mirror = mirror if mirror is not None else MirrorPolicy(
            timeout=config.mirroring.timeout, max_in_flight=config.mirroring.max_in_flight,
            queue_size=config.mirroring.queue_size)
        reuse = reuse or {}
        self.backends: dict[str, Backend] = {}
        for name, spec in config.backends.items():
            old = reuse.get(name)
            # An unchanged backend keeps its channels, health state and calls in flight.
            self.backends[name] = old if old is not None and old.config == spec else Backend(
                spec, max_message_size=max_message_size)
        self._routes = config.routes
        self._default = config.default
        self._reports = {(route.name, m): _MirrorReport(route.name, m)
                         for route in (*config.routes, *(
                             [config.default] if config.default else []))
                         for m in route.mirrors}
        self._by_method: dict[str, tuple[RouteConfig, ...]] = {}

    def start(self) -> None:
        """Start the backends' health checks."""
        for backend in self.backends.values():
            backend.start()

    def candidates(self, method: str) -> tuple[RouteConfig, ...]:
        """The routes whose method conditions admit ``method``, in file order."""
        found = self._by_method.get(method)
        if found is None:
            if len(self._by_method) >= _CACHE_LIMIT:
                self._by_method.clear()
            found = tuple(r for r in self._routes if r.applies_to(method))
            self._by_method[method] = found
        return found

    async def route(self, method: str, context: Any, peeker: Peeker) -> RouteConfig | None:
        """The route for one call, or None when nothing (not even a default) matches."""
        metadata: dict[str, list[Any]] | None = None
        view: TykView | None = None
        trusted: bool | None = None
        for route in self.candidates(method):
            if route.metadata:
                if trusted is None:
                    trusted = self._trust.trusts(context.peer())
                    if not trusted:
                        logger.debug("%s from %s: metadata not trusted; metadata routes skipped",
                                     method, context.peer())
                if not trusted:
                    continue
                if metadata is None:
                    metadata = {}
                    for key, value in context.invocation_metadata() or ():
                        metadata.setdefault(key, []).append(value)
                if not all(any(v in allowed for v in metadata.get(key, ()))
                           for key, allowed in route.metadata):
                    continue
            if route.tyk is not None:
                if view is None:
                    frame = await peeker.peek() or b""
                    view = object_view(frame) if method == DISPATCH else event_view(frame)
                if not tyk_matches(route.tyk, view):
                    continue
            return route
        return self._default

    async def __call__(self, method: str, context: Any, peeker: Peeker) -> StreamParameters | None:
        route = await self.route(method, context, peeker)
        if route is None:
            return None
        target = self.backends[route.backend].pick()
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s -> route %s, backend %s at %s", method, route.name, route.backend,
                         target.address)
        mirrors = []
        for name in route.mirrors:
            mirror: Target = self.backends[name].pick()
            mirrors.append(Destination(mirror.channel, err_handler=self._reports[route.name, name],
                                       on_finish=mirror.finish))
        explain = target.explain
        if self.security.expose_errors:
            explain = functools.partial(target.explain, expose=True)
        return StreamParameters(
            Destination(target.channel, err_handler=explain, on_finish=target.finish),
            mirrors, timeout=route.timeout, mirror=self.mirror)

    def retire_unused(self, successor: Router) -> None:
        """After a reload: retire the backends ``successor`` does not reuse."""
        kept = {id(b) for b in successor.backends.values()}
        for backend in self.backends.values():
            if id(backend) not in kept:
                backend.retire()

    async def aclose(self) -> None:
        """Stop checks and close every backend channel."""
        for backend in self.backends.values():
            await backend.aclose()

