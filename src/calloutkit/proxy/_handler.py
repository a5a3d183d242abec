"""Putting the proxy on a gRPC server: the catch-all `TransparentHandler`, explicit
`register_service`, and local handlers with `register_stream_handlers`.

Precedence on a ``grpc.aio`` server: registered method handlers (generated
``add_*Servicer_to_server``, `register_service`, `register_stream_handlers`) always win, then
generic handlers in the order they were added. So local services and the proxy coexist, and
an unknown method of a registered service falls through to the catch-all.

Cardinality is invisible on the wire, so the catch-all proxies every call as a bidi stream,
which is right for all four kinds. Methods named in ``unary_methods`` take a faster path (one
backend call, no pump); name only methods that really are unary.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc

from ..runtime._errors import ConfigError
from ._channels import ChannelPool
from ._director import Director, StreamParameters, status_of
from ._peeker import Peeker
from ._stream import Context, handle_stream, handle_unary

logger = logging.getLogger(__name__)

#: Unary methods of the gateways calloutkit serves: Tyk's coprocess plugin calls and Envoy's
#: external authorization check.
WELL_KNOWN_UNARY = frozenset({
    "/coprocess.Dispatcher/Dispatch",
    "/coprocess.Dispatcher/DispatchEvent",
    "/envoy.service.auth.v3.Authorization/Check",
})


def _validate_method(method: str) -> str:
    parts = method.split("/")
    if len(parts) != 3 or parts[0] or not parts[1] or not parts[2]:
        raise ConfigError(f"{method!r} is not a full method name like '/package.Service/Method'")
    return method


class TransparentHandler(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A catch-all generic handler that proxies every call its server does not serve itself.

    Add it last, after any local services. ``director(method, context, peeker)`` chooses the
    backends for each call (see `StreamParameters`). ``channels`` turns target strings in
    destinations into long-lived channels. ``expose_errors`` puts addresses and exception
    text in the proxy's own error statuses (by default they are only logged).

    Example::

        channel = grpc.aio.insecure_channel("127.0.0.1:50051", options=channel_options())

        async def director(method, context, peeker):
            return StreamParameters(Destination(channel))

        server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1),
                                          ("grpc.max_send_message_length", -1)])
        server.add_generic_rpc_handlers((TransparentHandler(director),))
    """

    def __init__(self, director: Director, *, unary_methods: Iterable[str] = (),
                 channels: ChannelPool | None = None, expose_errors: bool = False) -> None:
        self.director = director
        self.channels = channels
        self.expose_errors = expose_errors
        self.set_unary_methods(unary_methods)

    def set_unary_methods(self, methods: Iterable[str]) -> None:
        """Replace the methods that take the unary fast path."""
        unary = frozenset(_validate_method(m) for m in methods)
        self._unary_handlers = {m: grpc.unary_unary_rpc_method_handler(
            functools.partial(self.proxy_unary, m)) for m in unary}
        self.unary_methods = unary

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        handler = self._unary_handlers.get(method)
        if handler is not None:
            return handler
        return grpc.stream_stream_rpc_method_handler(functools.partial(self.proxy_stream, method))

    def method_handler(self, method: str) -> grpc.RpcMethodHandler:
        """The handler that proxies ``method`` (for explicit registration)."""
        return self._unary_handlers.get(method) or grpc.stream_stream_rpc_method_handler(
            functools.partial(self.proxy_stream, method))

    async def direct(self, method: str, context: Context,
                     peeker: Peeker) -> StreamParameters | None:
        """Ask the director; on refusal set the status on ``context`` and return None."""
        try:
            params = self.director(method, context, peeker)
            if inspect.isawaitable(params):
                params = await params
        except grpc.aio.AbortError:
            raise  # the director called context.abort(): its status is already on its way
        except Exception as exc:
            status = status_of(exc)
            if status is not None:  # like the Go proxies: the director's status, as it is
                context.set_code(status.code)
                context.set_details(status.details)
                return None
            logger.exception("director failed for %s", method)
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details("proxy director failed")
            return None
        if params is None:
            context.set_code(grpc.StatusCode.UNIMPLEMENTED)
            context.set_details(f"no route for {method}")
            return None
        if not isinstance(params, StreamParameters):
            logger.error("director returned %s for %s; expected StreamParameters",
                         type(params).__name__, method)
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details("proxy director failed")
            return None
        return params

    async def proxy_stream(self, method: str, request_iterator: Any, context: Context) -> None:
        """Proxy one call as a bidi stream (the generic path)."""
        peeker = Peeker(context)
        params = await self.direct(method, context, peeker)
        if params is not None:
            await handle_stream(context, method, params, peeker=peeker, channels=self.channels,
                                expose_errors=self.expose_errors)

    async def proxy_unary(self, method: str, request: bytes, context: Context) -> bytes | None:
        """Proxy one call known to be unary (the fast path)."""
        params = await self.direct(method, context, Peeker.of_request(request))
        if params is None:
            return None
        return await handle_unary(context, method, request, params, channels=self.channels,
                                  expose_errors=self.expose_errors)


def register_service(server: grpc.aio.Server, director: Director, service: str,
                     methods: Iterable[str], *, unary_methods: Iterable[str] = (),
                     channels: ChannelPool | None = None) -> None:
    """Proxy the named methods of ``service`` as if they were implemented on ``server``.

    Registered methods take precedence over generic handlers; other methods of the service
    still reach a `TransparentHandler`, if the server has one. ``unary_methods`` are short
    names (``"Get"``) of methods that take the fast path.

    Example::

        register_service(server, director, "echo.Echo", ["Unary", "Bidi"],
                         unary_methods=["Unary"])
    """
    unary = {f"/{service}/{name}" for name in unary_methods}
    handler = TransparentHandler(director, unary_methods=unary, channels=channels)
    server.add_registered_method_handlers(
        service, {name: handler.method_handler(f"/{service}/{name}") for name in methods})


StreamHandler = Callable[[Any, Context], Any]


def register_stream_handlers(server: grpc.aio.Server, service: str,
                             handlers: Mapping[str, StreamHandler]) -> None:
    """Serve methods of ``service`` locally with raw-bytes stream handlers.

    Each handler is ``async def handler(request_iterator, context)`` over raw bytes (read with
    ``context.read()``, answer with ``context.write()``); it can call `handle_stream` to proxy
    after all. Registered handlers win over the catch-all; other methods of the service still
    reach it.

    Example::

        async def stats(request_iterator, context):
            await context.write(b"...")

        register_stream_handlers(server, "echo.Admin", {"Stats": stats})
    """
    server.add_registered_method_handlers(service, {
        name: grpc.stream_stream_rpc_method_handler(func) for name, func in handlers.items()})
