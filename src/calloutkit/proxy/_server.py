"""`ProxyServer`: the routing proxy as a calloutkit server kind.

It stands on the shared runtime (`BaseServer`): TLS and plaintext listeners, gRPC and HTTP
health, drain on SIGTERM, ``calloutkit serve``. Its own health service is registered, so
``grpc.health.v1.Health/Check`` answers for the proxy and is never proxied. SIGHUP re-reads the
routing file: calls in flight keep the backends they were given, unchanged backends keep their
channels, and a file that does not validate is logged and ignored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import signal
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import grpc

from ..runtime._config import SERVER_OPTIONS, env_value
from ..runtime._errors import ConfigError
from ..runtime._server import BaseServer, Handlers
from ._backends import Backend
from ._channels import ChannelPool
from ._config import SecurityConfig
from ._director import Director, MirrorPolicy, StreamParameters
from ._handler import WELL_KNOWN_UNARY, TransparentHandler
from ._peeker import Peeker
from ._router import Router
from ._routes import RoutingConfig
from ._stream import Context
from ._tyk import DISPATCH
from ._validate import trusted_metadata as parse_trusted

logger = logging.getLogger(__name__)

_KINDS = {name: kind for name, kind, _ in SERVER_OPTIONS}
_REFLECTION = "/grpc.reflection."


class _ProxyHandler(TransparentHandler):
    """The catch-all, with the runtime's stream accounting (drain refuses new calls)."""

    def __init__(self, server: ProxyServer, unary_methods: Iterable[str],
                 channels: ChannelPool) -> None:
        super().__init__(server.direct, unary_methods=unary_methods, channels=channels,
                         expose_errors=server.security.expose_errors)
        self._server = server

    async def direct(self, method: str, context: Context,
                     peeker: Peeker) -> StreamParameters | None:
        # Reflection through the proxy would describe a backend (the default route's, mostly)
        # to anyone who asks: only when the proxy is told to forward it.
        if method.startswith(_REFLECTION) and not self._server.security.forward_reflection:
            context.set_code(grpc.StatusCode.UNIMPLEMENTED)
            context.set_details(f"no route for {method}")
            return None
        return await super().direct(method, context, peeker)

    async def proxy_stream(self, method: str, request_iterator: Any, context: Context) -> None:
        server = self._server
        if not server._enter_stream():
            await server._refuse(context)
            return
        try:
            await super().proxy_stream(method, request_iterator, context)
        finally:
            server._leave_stream()

    async def proxy_unary(self, method: str, request: bytes, context: Context) -> bytes | None:
        server = self._server
        if not server._enter_stream():
            await server._refuse(context)
            return None
        try:
            return await super().proxy_unary(method, request, context)
        finally:
            server._leave_stream()


class ProxyServer(BaseServer):
    """A transparent gRPC routing proxy on the calloutkit runtime.

    Give it a routing file (or a `RoutingConfig`), or a ``director``, or subclass it and
    override `direct`. Listener options in the file's ``listeners:`` section apply unless
    given here or in a ``CALLOUTKIT_*`` variable; all other constructor options are the
    runtime's (``plaintext_address``, ``grace_period``, ...). ``unary_methods`` overrides the
    file's fast-path methods. ``expose_errors``, ``forward_reflection`` and
    ``trusted_metadata`` (None, a list of networks, or ``[]`` for none) override the file's
    ``security`` section when given.

    Example::

        ProxyServer("routes.yaml").run()        # or: calloutkit proxy --config routes.yaml

        class MyProxy(ProxyServer):             # or: calloutkit serve my_proxy.py
            async def direct(self, method, context, peeker):
                return StreamParameters(Destination(self.channels.get("10.0.0.5:5555")))
    """

    protocol = "proxy"

    def __init__(self, config: str | os.PathLike[str] | RoutingConfig | None = None, *,
                 director: Director | None = None, unary_methods: Iterable[str] | None = None,
                 mirror: MirrorPolicy | None = None, expose_errors: bool | None = None,
                 forward_reflection: bool | None = None,
                 trusted_metadata: Iterable[str] | str | None = None, **options: Any) -> None:
        routing = config if isinstance(config, RoutingConfig) or config is None else (
            RoutingConfig.load(config))
        if routing is not None and director is not None:
            raise ConfigError("ProxyServer: give a routing config or a director, not both")
        if routing is None and director is None and type(self).direct is ProxyServer.direct:
            raise ConfigError("ProxyServer needs a routing file (config=...), a director, or "
                              "a direct() method in a subclass")
        options = {**_file_listeners(routing, options), **options}
        if _plaintext_only(routing, options):
            options["disable_tls"] = True
        super().__init__(**options)
        self._security_options: dict[str, Any] = {}
        if expose_errors is not None:
            self._security_options["expose_errors"] = expose_errors
        if forward_reflection is not None:
            self._security_options["forward_reflection"] = forward_reflection
        if trusted_metadata is not None:
            self._security_options["trusted_metadata"] = _trusted(trusted_metadata)
        #: What the proxy reveals and whose metadata it believes: the file's ``security``
        #: section with the options given here over it.
        self.security = self._merge_security(routing)
        self.routing = routing
        self.mirror = mirror if mirror is not None else (
            _policy(routing) if routing is not None else MirrorPolicy())
        self._fixed_unary = unary_methods is not None
        unary = unary_methods if unary_methods is not None else (
            routing.unary_methods if routing is not None else WELL_KNOWN_UNARY)
        self._director = director
        self._router: Router | None = None
        self._retired: list[Backend] = []
        self._reload_task: asyncio.Task[bool] | None = None
        self._reload_again = False
        self._closed = False
        #: Channels for target strings in `Destination` (directors and subclasses).
        self.channels = ChannelPool(max_message_size=self.config.max_message_size)
        self.handler = _ProxyHandler(self, unary, self.channels)

    # -- routing ------------------------------------------------------------------------------

    @property
    def router(self) -> Router | None:
        """The routing file's director while serving (None without a file)."""
        return self._router

    async def direct(self, method: str, context: Context,
                     peeker: Peeker) -> StreamParameters | None:
        """Choose the backends of one call: the routing file's answer, or the director's.

        Override it in a subclass to route in code; raise `ProxyError` to refuse a call,
        return None for UNIMPLEMENTED.
        """
        if self._router is not None:
            return await self._router(method, context, peeker)
        if self._director is None:
            return None
        result = self._director(method, context, peeker)
        if inspect.isawaitable(result):
            result = await result
        return result  # type: ignore[no-any-return]

    def _handlers(self) -> Handlers:
        # The runtime reports these names SERVING on the proxy's health service, so a gateway
        # that health-checks its service by name (e.g. coprocess.Dispatcher) gets an answer.
        names = _service_names(self.routing) if self.routing is not None else []
        return [(name, self.handler) for name in names] or [("", self.handler)]

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.routing is not None and self._router is None:
            self._router = Router(self.routing, mirror=self.mirror, security=self.security,
                                  max_message_size=self.config.max_message_size)
            self._router.start()
        try:
            await super().start()
        except BaseException:
            await self._close()
            raise
        if self.routing is not None:
            logger.info("routing %d route(s)%s to %d backend(s) from %s",
                        len(self.routing.routes), " and a default" if self.routing.default
                        else "", len(self.routing.backends), self.routing.path)

    async def stop(self, grace: float | None = None) -> None:
        await super().stop(grace)
        await self._close()

    async def serve(self) -> None:
        try:
            await super().serve()
        finally:
            await self._close()

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_task.cancel()
            await asyncio.gather(self._reload_task, return_exceptions=True)
        await self.mirror.aclose()
        if self._router is not None:
            await self._router.aclose()
        for backend in self._retired:
            await backend.aclose()
        await self.channels.aclose()

    async def reload(self) -> bool:
        """Re-read the routing file; True when the new routes are in use.

        Calls in flight are untouched. A file that does not validate leaves the current
        routes in place (the error is logged). Listener changes need a restart.
        """
        if self.routing is None:
            logger.warning("reload: this proxy has no routing file")
            return False
        try:
            fresh = RoutingConfig.load(self.routing.path)
        except ConfigError as exc:
            logger.error("reload failed, still serving the previous routes: %s", exc)
            return False
        if dict(fresh.listeners) != dict(self.routing.listeners):
            logger.warning("listeners changed in %s: restart the proxy to apply them",
                           fresh.path)
        mirroring = fresh.mirroring
        self.mirror.timeout = mirroring.timeout
        self.mirror.max_in_flight = mirroring.max_in_flight
        self.mirror.queue_size = mirroring.queue_size
        if not self._fixed_unary:
            self.handler.set_unary_methods(fresh.unary_methods)
        old, self.routing = self._router, fresh
        self.security = self._merge_security(fresh)
        self.handler.expose_errors = self.security.expose_errors
        if old is not None and not self._closed:
            router = Router(fresh, mirror=self.mirror, reuse=old.backends, security=self.security,
                            max_message_size=self.config.max_message_size)
            router.start()
            self._router = router
            old.retire_unused(router)
            kept = {id(b) for b in router.backends.values()}
            self._retired = [b for b in (*self._retired, *old.backends.values())
                             if id(b) not in kept]
        logger.info("reloaded %s: %d route(s), %d backend(s)", fresh.path, len(fresh.routes),
                    len(fresh.backends))
        return True

    def _merge_security(self, routing: RoutingConfig | None) -> SecurityConfig:
        base = routing.security if routing is not None else SecurityConfig()
        return dataclasses.replace(base, **self._security_options)

    def _on_sighup(self) -> None:
        super()._on_sighup()
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = True
            return
        self._reload_task = asyncio.ensure_future(self._reload_on_signal())

    async def _reload_on_signal(self) -> bool:
        logger.info("SIGHUP: reloading %s", self.routing.path if self.routing else "routes")
        result = await self.reload()
        while self._reload_again:
            self._reload_again = False
            result = await self.reload()
        return result

    async def _run_with_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
        await super()._run_with_signals()


def _trusted(value: Iterable[str] | str) -> tuple[str, ...] | None:
    """``trusted_metadata`` as given to `ProxyServer` (``"any"``, ``"none"``, networks);
    ConfigError names a bad network."""
    try:
        return parse_trusted(value if isinstance(value, str) else list(value) or False)
    except ValueError as exc:
        raise ConfigError(f"trusted_metadata: {exc}") from None


def _service_names(routing: RoutingConfig) -> list[str]:
    """The services a routing file names: those of its methods, and Tyk's for tyk routes."""
    names = set()
    for route in (*routing.routes, *([routing.default] if routing.default else [])):
        if route.tyk is not None:
            names.add(DISPATCH.split("/")[1])
        for method in route.methods or ():
            if method != "*":
                names.add(method.split("/")[1])
    return sorted(names)


def _file_listeners(routing: RoutingConfig | None,
                    options: Mapping[str, Any]) -> dict[str, Any]:
    """The file's listener options that neither an argument nor a variable overrides."""
    if routing is None:
        return {}
    environ = options.get("environ")
    return {key: value for key, value in routing.listeners.items()
            if key not in options and env_value(key, _KINDS[key], environ) is None}


# Options that ask for (or about) the TLS listener.
_TLS_OPTIONS = ("address", "secure_address", "port", "cert_chain_path", "private_key_path",
                "cert_chain", "private_key", "disable_tls", "secure_health_check")


def _plaintext_only(routing: RoutingConfig | None, options: Mapping[str, Any]) -> bool:
    """True when the file sets plaintext listeners and nothing anywhere mentions TLS.

    Such a proxy is meant to speak h2c only; looking for a certificate at the default path would
    only warn that it is missing.
    """
    if routing is None or not any(key in routing.listeners
                                  for key in ("plaintext_address", "plaintext_port")):
        return False
    environ = options.get("environ")
    return not any(key in options or (key in _KINDS and env_value(key, _KINDS[key], environ)
                                      is not None) for key in _TLS_OPTIONS)


def _policy(routing: RoutingConfig) -> MirrorPolicy:
    mirroring = routing.mirroring
    return MirrorPolicy(timeout=mirroring.timeout, max_in_flight=mirroring.max_in_flight,
                        queue_size=mirroring.queue_size)
