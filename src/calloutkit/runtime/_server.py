"""The runtime every calloutkit server stands on.

`BaseServer` owns the listeners (TLS, plaintext h2c, HTTP health), the gRPC health service, the
optional reflection service, the pool for synchronous callbacks, and the lifecycle: `start`,
`stop(grace)`, `serve`, the blocking `run` with signal handling, and the thread-safe `shutdown`.
A server kind (ext_proc, network ext_proc, Tyk, proxy) subclasses it and supplies its gRPC
handlers through `_handlers()`.

Draining, in order: health turns NOT_SERVING (gRPC) and 503 (HTTP); new streams are still served
for ``drain_delay`` seconds, so that load balancers see the health change before anything is
refused; then new streams are refused with UNAVAILABLE while health keeps answering; streams in
flight get up to the grace period to end; then the gRPC server stops and cancels whatever is
left.

Health is NOT_SERVING also while every thread of the callback pool is stuck in a ``def``
callback past ``callback_timeout`` (see `CallbackPool`), and SERVING again when one returns.

Two transports serve the same method table: grpc.aio (``transport="grpcio"``, the default) and
the compiled one in `calloutkit_native` (``transport="native"``, the calloutkit-native
distribution; its Python side is `._native`), which also sends GOAWAY on every open connection
when the refusing begins. ``transport="auto"`` takes native wherever it can serve.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import stat
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import CoroutineType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

if TYPE_CHECKING:
    from calloutkit_native import Server

from . import _native
from ._config import (
    UNIX_PREFIX,
    UNSET,
    ServerConfig,
    Unset,
    format_address,
    is_unix,
    merge_environment,
)
from ._errors import ConfigError, StreamAbort
from ._health import HttpHealthServer
from ._idle import StreamWatch, idle_message
from ._invoke import CallbackPool, Invoker
from ._malformed import MalformedInput, describe, parse_requests
from ._middleware import Describe, Middleware, chain, check_middleware, describer
from ._native import NativeHealth
from ._tls import ServerTls

if TYPE_CHECKING:
    from ._metrics import ServerMetrics

logger = logging.getLogger(__name__)

C = TypeVar("C")

_CONNECTION_AGE_MS = 30_000
# SETTINGS_MAX_CONCURRENT_STREAMS of the native transport's connections (grpc.aio sets none).
# Envoy's HTTP/2 pool does open another connection once a connection has as many streams as
# the server allows, but it learns the limit only from the server's SETTINGS: streams it
# queued for a new connection before then all go out, and those past the limit are refused
# (REFUSED_STREAM), which ext_proc turns into a failed request unless its grpc_service has a
# retry policy. Measured behind Envoy 1.40 with 100 here: 250 clients at once, 50 requests
# failed. So the limit stays above what Envoy can have in flight to a cluster by default
# (circuit_breakers max_requests: 1024), where it never refuses one of Envoy's streams; to
# spread one gateway over several connections (and so workers), set max_concurrent_streams
# in the cluster's http2_protocol_options, which Envoy applies from the first stream.
# Connection ageing (workers > 1) spreads them over time either way.
_NATIVE_MAX_STREAMS = 1024
_HEALTH_CHECK = f"/{health.SERVICE_NAME}/Check"
_HEALTH_WATCH = f"/{health.SERVICE_NAME}/Watch"
# A method of the native transport: kind, handler, counted, end_idle_on_drain, idle timeout
# and its message (see `calloutkit_native.Server`).
_NativeMethod = tuple[str, Any, bool, bool, tuple[float, str] | None]


# What a server kind serves, per service name: its methods by name, or a catch-all handler.
Handlers = Sequence[tuple[str, Mapping[str, grpc.RpcMethodHandler] | grpc.GenericRpcHandler]]


class _MethodTable(grpc.GenericRpcHandler):  # type: ignore[misc]
    """The server's one generic handler: every method in one dict, one lookup per call.

    grpc.aio asks each generic handler in turn, a Python call each, and for every call it
    accepts waits on one pending request per *registered* method as well (health's three
    alone cost a one-message ext_proc stream about 4% more instructions). Generated
    ``add_*_to_server`` functions fill this table as if it were the server; their handlers
    (health, reflection) get their requests as bytes and parse them in `parse_requests`, so a
    malformed one is INVALID_ARGUMENT like anywhere else. A catch-all handler, such as the
    proxy's, is asked only for methods the table does not have.
    """

    def __init__(self) -> None:
        self._methods: dict[str, grpc.RpcMethodHandler] = {}
        self._others: list[grpc.GenericRpcHandler] = []

    def add_registered_method_handlers(self, service: str,
                                       handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        for method, handler in handlers.items():
            name = f"/{service}/{method}"
            self._methods[name] = parse_requests(handler, name, logger)
        # Generated code also adds a generic handler for the methods it registers.
        self._others = [h for h in self._others if not (
            isinstance(h, grpc.ServiceRpcHandler) and h.service_name() == service)]

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._others.extend(h for h in handlers if h not in self._others)

    def add(self, service: str,
            handler: Mapping[str, grpc.RpcMethodHandler] | grpc.GenericRpcHandler) -> None:
        if isinstance(handler, grpc.GenericRpcHandler):
            self.add_generic_rpc_handlers((handler,))
        else:
            self.add_registered_method_handlers(service, handler)

    def service(self, handler_call_details: grpc.HandlerCallDetails,
                ) -> grpc.RpcMethodHandler | None:
        found = self._methods.get(handler_call_details.method)
        if found is None:
            for other in self._others:
                if (found := other.service(handler_call_details)) is not None:
                    break
        return found


def _check_bindable(address: tuple[str, int], what: str, *, reuse_port: bool) -> None:
    """Raise `ConfigError` when no address that ``address`` resolves to can be bound.

    When gRPC core fails to bind it logs a line from C straight to stderr (``E... add_port.cc
    ...``), then Python gets a RuntimeError that does not say why. Its GRPC_VERBOSITY is read
    once, when gRPC initialises, so it cannot be lowered for this one call, and lowering it
    for the whole process would hide every later gRPC error from the user. So a plain socket
    tries the bind first, with the options gRPC's own listener uses (SO_REUSEADDR always,
    SO_REUSEPORT only for our workers): it fails in the same cases, quietly, and says why.
    Should the port be taken between this probe and gRPC's bind, `_bind` still reports
    gRPC's error.
    """
    host, port = address
    if is_unix(address):
        _check_unix_bindable(host[len(UNIX_PREFIX):], what)
        return
    if port == 0:
        return
    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError:
        return  # gRPC resolves names its own way; let it report what it cannot resolve
    first_error: OSError | None = None
    for family, kind, proto, _, sockaddr in found:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port and hasattr(socket, "SO_REUSEPORT"):
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                probe.bind(sockaddr)
        except OSError as exc:
            first_error = first_error or exc
            continue
        return  # gRPC too succeeds when any one of the resolved addresses binds
    if first_error is not None:
        raise ConfigError(f"cannot bind {what} listener {format_address(address)}: "
                          f"{first_error.strerror or first_error}")


def _check_unix_bindable(path: str, what: str) -> None:
    """gRPC replaces a socket file left at ``path``, even one a live server listens on, and
    says nothing useful when the folder is missing: check both first."""
    where = f"cannot bind {what} listener unix:{path}"
    if not os.path.isdir(os.path.dirname(path)):
        raise ConfigError(f"{where}: no folder {os.path.dirname(path)}")
    if not os.path.exists(path):
        return
    if not stat.S_ISSOCK(os.stat(path).st_mode):
        raise ConfigError(f"{where}: the path exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return  # a socket file nobody listens on: gRPC replaces it
    raise ConfigError(f"{where}: another server listens on it")


def _peer(grpc_context: Any) -> str:
    try:
        return str(grpc_context.peer())
    except Exception:  # a context without a peer (in-process)
        return "?"


def _loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


class BaseServer(abc.ABC):
    """A gRPC server with truthful health, graceful drain and the documented listener options.

    Subclasses implement `_handlers`; users subclass the concrete kinds (`CalloutServer`,
    `NetworkCalloutServer`, ...). Construction validates every option and raises `ConfigError`.
    Options not passed are filled from ``CALLOUTKIT_<OPTION>`` environment variables
    (``environ`` replaces `os.environ`), so a deployment can move ports without touching code;
    an option passed explicitly wins over its variable, even as False, 0 or None.

    ``middleware`` (constructor only) wraps every callback in functions of your own, and
    ``metrics`` / ``metrics_address`` serve Prometheus metrics at ``/metrics``, and
    ``tracing`` makes an OpenTelemetry span per callback call (docs/observability.md).

    Example (embedding, e.g. in tests)::

        server = CalloutServer(plaintext_address=("127.0.0.1", 0), disable_tls=True,
                               combined_health_check=True)
        await server.start()
        print(server.plaintext_port)
        await server.stop(grace=5)
    """

    #: Whether reflection is on when the caller does not say.
    default_reflection: bool = False
    #: The protocol's name in a middleware's `CallInfo` and in metric labels.
    protocol: str = "grpc"
    # Set on the instance only when in use. A server's attributes share one key table while
    # there are at most 30 of them (CPython 3.11); past that every ``self.x`` on the hot path
    # is a slower lookup, measurably (8% per message in bench). It has 28.
    _middleware: tuple[Middleware, ...] = ()
    _server_metrics: ServerMetrics | None = None  # once started with metrics on
    _native_health: NativeHealth | None = None  # gRPC health, once started on native

    def __init__(
        self,
        address: Any = UNSET,
        port: int | Unset | None = UNSET,
        health_check_address: Any = UNSET,
        health_check_port: int | Unset | None = UNSET,
        combined_health_check: bool | Unset = UNSET,
        secure_health_check: bool | Unset = UNSET,
        plaintext_address: Any = UNSET,
        plaintext_port: int | Unset | None = UNSET,
        disable_plaintext: bool | Unset = UNSET,
        default_ip: str | Unset | None = UNSET,
        cert_chain: bytes | None = None,
        cert_chain_path: str | Unset | None = UNSET,
        private_key: bytes | None = None,
        private_key_path: str | Unset | None = UNSET,
        server_thread_count: int | Unset | None = UNSET,
        *,
        secure_address: Any = UNSET,
        disable_tls: bool | Unset = UNSET,
        grace_period: float | Unset | None = UNSET,
        max_message_size: int | Unset | None = UNSET,
        reflection: bool | Unset | None = UNSET,
        workers: int | Unset | None = UNSET,
        event_loop: str | Unset | None = UNSET,
        stream_idle_timeout: float | Unset | None = UNSET,
        client_ca: bytes | None = None,
        client_ca_path: str | Unset | None = UNSET,
        require_client_auth: bool | Unset | None = UNSET,
        drain_delay: float | Unset | None = UNSET,
        callback_timeout: float | Unset | None = UNSET,
        transport: str | Unset | None = UNSET,
        middleware: Sequence[Middleware] | None = None,
        metrics: bool | Unset | None = UNSET,
        metrics_address: Any = UNSET,
        tracing: bool | Unset | None = UNSET,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        options = merge_environment(dict(
            address=address, port=port, health_check_address=health_check_address,
            health_check_port=health_check_port, combined_health_check=combined_health_check,
            secure_health_check=secure_health_check, plaintext_address=plaintext_address,
            plaintext_port=plaintext_port, disable_plaintext=disable_plaintext,
            default_ip=default_ip, cert_chain_path=cert_chain_path,
            private_key_path=private_key_path, server_thread_count=server_thread_count,
            secure_address=secure_address, disable_tls=disable_tls, grace_period=grace_period,
            max_message_size=max_message_size, reflection=reflection, workers=workers,
            event_loop=event_loop, stream_idle_timeout=stream_idle_timeout,
            client_ca_path=client_ca_path, require_client_auth=require_client_auth,
            drain_delay=drain_delay, callback_timeout=callback_timeout,
            transport=transport, metrics=metrics, metrics_address=metrics_address,
            tracing=tracing),
            environ)
        if options.get("reflection") is None:
            options["reflection"] = self.default_reflection
        self.config = ServerConfig.build(cert_chain=cert_chain, private_key=private_key,
                                         client_ca=client_ca, **options)
        self._tls = ServerTls(self.config) if self.config.cert_chain is not None else None
        self._pool = CallbackPool(self.config.thread_count,
                                  timeout=self.config.callback_timeout,
                                  on_exhausted=self._pool_exhausted)
        # Read by `invoker`, i.e. by the server kinds' constructors once this one returns.
        # Metrics start with the server (in each worker, after the fork); their middleware,
        # outermost, is in place from here since the server kinds build their invokers next.
        wrappers = check_middleware(middleware)
        if self.config.tracing:
            from ._tracing import tracing_middleware

            wrappers = (tracing_middleware(self._error_policy_name), *wrappers)
            self._pool.carry_context = True
        if self.config.metrics:
            wrappers = (self._metrics_middleware, *wrappers)
        if wrappers:
            self._middleware = wrappers
        self._grpc: grpc.aio.Server | None = None
        self._native: Server | None = None  # with transport="native"
        self._health_servicer: health.aio.HealthServicer | None = None
        self._http_health: HttpHealthServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serving = False
        self._stopping = False  # health says NOT_SERVING: drain_delay, then draining
        self._draining = False  # new streams are refused
        self._health_names: list[str] = []
        self._health_tasks: set[asyncio.Future[None]] = set()
        self._active_streams = 0
        self._watches: set[StreamWatch] = set()
        self._idle: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._shutdown_requested = False
        self.secure_port: int | None = None
        self.plaintext_port: int | None = None
        self.health_check_port: int | None = None
        # The documented server's flag, polled by code that runs `run()` in a thread: True
        # once every listener is serving, and it stays True (as there) after a stop.
        self._setup = False

    # -- the documented server's attributes ---------------------------------------------------
    # Read-only views of the frozen config: a listener cannot move once the server is built.
    # Each is the address as configured, None when that listener is off; with port 0 the port
    # the kernel chose is in `secure_port`, `plaintext_port` or `health_check_port` once
    # started.

    @property
    def secure_address(self) -> tuple[str, int] | None:
        """The TLS gRPC listener ``(host, port)`` as configured; None when TLS is off."""
        return self.config.secure_address

    @property
    def address(self) -> tuple[str, int] | None:
        """The documented name of `secure_address`."""
        return self.config.secure_address

    @property
    def plaintext_address(self) -> tuple[str, int] | None:
        """The plaintext (h2c) gRPC listener ``(host, port)``; None when disabled."""
        return self.config.plaintext_address

    @property
    def health_check_address(self) -> tuple[str, int] | None:
        """The HTTP health listener ``(host, port)``; None with ``combined_health_check``."""
        return self.config.health_check_address

    @property
    def _health_check_server(self) -> HttpHealthServer | None:
        # The documented server's name for its HTTP health server: None until started, and
        # always None with combined_health_check.
        return self._http_health

    @property
    def _callout_server(self) -> Any:
        # The documented server's name for its gRPC server: None until started; the
        # grpc.aio.Server on grpcio, the native transport's Server on native.
        return self._grpc if self._native is None else self._native

    # -- what a server kind provides -----------------------------------------------------

    @abc.abstractmethod
    def _handlers(self) -> Handlers:
        """Return ``(service full name, {method name: handler})`` pairs to serve; a generic
        handler in place of the dict catches every method nothing else serves."""

    def _grpc_options(self) -> list[tuple[str, Any]]:
        size, workers = self.config.max_message_size, self.config.workers
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            # gRPC turns SO_REUSEPORT on by default, which lets two servers share a port without
            # a word; only our own workers may share one.
            ("grpc.so_reuseport", 1 if workers > 1 else 0),
        ]
        if workers > 1:
            # Envoy keeps a few HTTP/2 connections for ever; ageing them out makes it
            # reconnect, and the kernel may hand the new connection to another worker.
            options += [("grpc.max_connection_age_ms", _CONNECTION_AGE_MS),
                        ("grpc.max_connection_age_grace_ms",
                         int(self.config.grace_period * 1000))]
        return options

    def invoker(self, func: Callable[..., Any], phase: str | None = None, *,
                describe: Describe | None = None) -> Invoker:
        """Wrap a user callback so it is awaited, run inline, or run in the thread pool.

        With ``middleware`` the callback is wrapped in it first; ``phase`` (default: the
        callback's name without ``on_``) or ``describe`` say what its `CallInfo` holds.
        Without middleware the callback is called exactly as it would be without the option.
        """
        if self._middleware:
            if describe is None:
                name = getattr(func, "__name__", "callback")
                describe = describer(self.protocol, phase or name.removeprefix("on_"), name)
            func = chain(self._pool, func, self._middleware, describe)
        return Invoker(self._pool, func)

    def _overridden(self, name: str, base: type) -> Invoker | None:
        """The invoker of method ``name`` when this class overrides ``base``'s, else None.

        A callback left at its default is skipped rather than called: no per-message call,
        and for a ``def`` no thread-pool hop.
        """
        if getattr(type(self), name) is getattr(base, name):
            return None
        return self.invoker(getattr(self, name))

    # -- stream accounting, used by handlers ---------------------------------------------

    @property
    def serving(self) -> bool:
        """True between a successful `start` and the beginning of `stop`."""
        return self._serving and not self._stopping

    def _healthy(self) -> bool:
        """What health checks answer: serving, and able to run a ``def`` callback."""
        return self._serving and not self._stopping and not self._pool.exhausted

    def _pool_exhausted(self, exhausted: bool) -> None:
        # Called on the loop's thread. After a stop has begun the health servicer ignores
        # this: it stays NOT_SERVING for good.
        if self._native_health is not None:
            self._native_health.changed()
        if self._health_servicer is None:
            return
        status = (health_pb2.HealthCheckResponse.NOT_SERVING if exhausted
                  else health_pb2.HealthCheckResponse.SERVING)
        task = asyncio.ensure_future(self._set_health(status))
        self._health_tasks.add(task)  # a task nobody references may be collected mid-way
        task.add_done_callback(self._health_tasks.discard)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        assert self._health_servicer is not None
        for name in self._health_names:
            await self._health_servicer.set(name, status)

    @property
    def active_streams(self) -> int:
        """Streams (or calls) in flight right now."""
        if self._native is not None:
            # The transport counts every call it serves, unary ones too (which also count
            # themselves in here, on the loop): the larger is the truth.
            return max(self._active_streams, int(self._native.active_streams))
        return self._active_streams

    def _enter_stream(self) -> bool:
        """Count a new stream in; False when draining (the caller refuses the stream)."""
        if self._draining:
            return False
        self._active_streams += 1
        return True

    def _leave_stream(self) -> None:
        self._active_streams -= 1
        if self._draining and self._active_streams == 0 and self._idle is not None:
            self._idle.set()

    async def _refuse(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "server is draining")

    def _unary_handler(self, answer: Callable[[bytes, Any], Awaitable[bytes]],
                       ) -> grpc.RpcMethodHandler:
        """A unary method served by ``answer(request bytes, context) -> reply bytes``, with
        drain accounting: refused while draining, counted while running; `StreamAbort` ends the
        call with its status, and any other exception with INTERNAL and a fixed text (logged
        here with its traceback: it is calloutkit's bug, and its text must not reach the
        gateway)."""
        async def call(data: bytes, context: Any) -> bytes:
            if not self._enter_stream():
                await self._refuse(context)
            try:
                return await answer(data, context)
            except StreamAbort as abort:
                await context.abort(abort.code, abort.details)
                raise  # unreachable: abort raises
            except Exception:
                logger.exception("%s failed", getattr(answer, "__qualname__", "a unary call"))
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
                raise  # unreachable
            finally:
                self._leave_stream()

        # The native transport steps ``answer`` off the loop instead (runtime._native): it
        # awaits nothing but `Invoker` calls.
        call.calloutkit_answer = answer  # type: ignore[attr-defined]
        return grpc.unary_unary_rpc_method_handler(call)

    def _bidi_handler(self, service: str,
                      stream: Callable[[AsyncIterator[bytes], Any], AsyncIterator[bytes]],
                      ) -> tuple[str, Mapping[str, grpc.RpcMethodHandler]]:
        """``service/Process`` served by the async generator ``stream``, which takes the
        requests as bytes and yields its replies serialized already."""
        return service, {"Process": grpc.stream_stream_rpc_method_handler(stream)}

    def _stream_function(self, new_context: Callable[[Any], C],
                         answer: Callable[[Any, C], Any], request_type: Any, *,
                         end_idle_on_drain: bool = True, off_loop: bool = True,
                         ) -> Callable[[AsyncIterator[bytes], Any], AsyncIterator[bytes]]:
        """The handler of a stream-per-request protocol (ext_proc L7 and L4).

        One answer per request, with drain accounting: refused while draining, counted while
        open, a reply sent for each answer that is not None; `StreamAbort` ends the stream
        with its status. Each request arrives as bytes and is parsed as ``request_type``
        here; bytes that do not parse end the stream with INVALID_ARGUMENT (`MalformedInput`).
        ``answer`` returns the reply (a message, or its wire bytes), None, or a coroutine
        giving either: a reply that is ready at once costs no coroutine at all. (grpc.aio
        needs an async generator *function* here, hence the closure rather than a generator
        method.)

        With ``end_idle_on_drain``, a drain ends a stream that waits for its next message at
        once (UNAVAILABLE) instead of letting it hold the drain for the grace period; a
        stream mid-callback sends its reply first.

        ``off_loop`` says the native transport may step ``answer``'s coroutines off the event
        loop (runtime._native): true when they await nothing but `Invoker` calls, which move
        to the loop by themselves when they need it.
        """
        timeout = self.config.stream_idle_timeout
        clock = asyncio.get_running_loop().time if timeout is not None else None
        parse = request_type.FromString
        full_name = request_type.DESCRIPTOR.full_name
        malformed = MalformedInput(logger, f"malformed request: expected {full_name}")

        async def stream(requests: AsyncIterator[bytes],
                         grpc_context: Any) -> AsyncIterator[bytes]:
            if not self._enter_stream():
                await self._refuse(grpc_context)
                return
            watch = StreamWatch(timeout)
            if end_idle_on_drain:
                self._watches.add(watch)
            try:
                context = new_context(grpc_context)
                messages = requests.__aiter__()
                while True:
                    if self._draining and end_idle_on_drain:  # the grace is not for waiting
                        raise StreamAbort(grpc.StatusCode.UNAVAILABLE, "server is draining")
                    if clock is not None:
                        watch.since = clock()
                    watch.waiting = True
                    try:
                        data = await messages.__anext__()
                    except StopAsyncIteration:
                        break
                    finally:
                        watch.waiting = False
                    # The one parse grpc's deserializer would have made; a try block costs
                    # nothing until it catches.
                    try:
                        request = parse(data)
                    except Exception as exc:
                        raise malformed(f"Process: malformed request from {_peer(grpc_context)}"
                                        f", expected {full_name} ({describe(exc)})") from None
                    response = answer(request, context)
                    if response.__class__ is CoroutineType:
                        response = await response
                    if response is not None:
                        # Serialized here rather than by a serializer function that grpc
                        # would call per message.
                        yield (response if response.__class__ is bytes
                               else response.SerializeToString())
            except StreamAbort as abort:
                await grpc_context.abort(abort.code, abort.details)
            except asyncio.CancelledError:
                if watch.ending is None:
                    raise
                watch.uncancel()
                await grpc_context.abort(*watch.ending)
            finally:
                watch.close()
                self._watches.discard(watch)
                self._leave_stream()

        def parse_checked(data: bytes, context: Any) -> Any:
            try:
                return parse(data)
            except Exception as exc:
                raise malformed(f"Process: malformed request from {_peer(context)}"
                                f", expected {full_name} ({describe(exc)})") from None

        # The native transport calls the same pair, per message, without the generator (and
        # parses with the same answer to malformed bytes), and ends a stream waiting for its
        # next message at the drain as this loop does.
        stream.calloutkit_parts = (  # type: ignore[attr-defined]
            new_context, answer, parse_checked, end_idle_on_drain, off_loop)
        return stream

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def _started(self) -> bool:
        return self._grpc is not None or self._native is not None

    async def start(self) -> None:
        """Bind every listener and start serving; health turns SERVING once all are bound."""
        if self._started:
            raise RuntimeError("server already started")
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._stopped = asyncio.Event()
        if self.config.metrics:
            # Before anything asks for `_handlers()` (the transport's choice included): the
            # stream functions they build count what they see.
            self._start_metrics()
        if self.config.transport == "native" and not self._auto_falls_back():
            await self._start_native()
            return
        server = grpc.aio.server(options=self._grpc_options())
        handlers = list(self._handlers())
        names = [name for name, _ in handlers]
        table = _MethodTable()
        self._health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health_servicer, table)
        if self.config.reflection:
            from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
                reflection.aio.ReflectionServicer(
                    [*names, health.SERVICE_NAME, reflection.SERVICE_NAME]), table)
        for name, handler in handlers:
            table.add(name, handler)
        server.add_generic_rpc_handlers((table,))
        cfg = self.config
        try:
            if cfg.plaintext_address is not None:
                self.plaintext_port = self._bind(
                    server, cfg.plaintext_address, None, "plaintext")
            if cfg.secure_address is not None:
                assert self._tls is not None
                creds = self._tls.grpc_credentials()
                self.secure_port = self._bind(server, cfg.secure_address, creds, "TLS")
            await server.start()
            self._grpc = server
            await self._start_http_health()
        except BaseException:
            await self._stop_http()
            await server.stop(0)
            self._grpc = None
            raise
        self._health_names = ["", *names]
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._started_serving()

    def _started_serving(self) -> None:
        self._serving = True
        self._setup = True
        if self._native_health is not None:
            self._native_health.changed()  # a watch opened before this saw NOT_SERVING
        logger.info("%s serving: %s (%s loop%s)", type(self).__name__,
                    ", ".join(self._listening()), _loop_name(asyncio.get_running_loop()),
                    ", native transport" if self._native is not None else "")
        if self._shutdown_requested:
            self._begin_stop()

    async def _start_http_health(self) -> None:
        """The HTTP health listener, serving ``/metrics`` too unless metrics have their own."""
        cfg = self.config
        scrape = self._scrape if cfg.metrics else None
        if cfg.health_check_address is not None:
            self._http_health = HttpHealthServer(
                self._healthy, reuse_port=cfg.workers > 1,
                metrics=scrape if cfg.metrics_address is None else None)
            host, port = cfg.health_check_address
            try:
                self.health_check_port = await self._http_health.start(
                    host, port, self._health_tls() if cfg.secure_health_check else None)
            except OSError as exc:
                raise ConfigError(
                    f"cannot bind health check listener {format_address((host, port))}: "
                    f"{exc.strerror or exc}") from None
        if cfg.metrics_address is not None and self._server_metrics is not None:
            listener = self._server_metrics.listener = HttpHealthServer(
                None, reuse_port=cfg.workers > 1, metrics=scrape)
            host, port = cfg.metrics_address
            try:
                self._server_metrics.port = await listener.start(host, port)
            except OSError as exc:
                raise ConfigError(
                    f"cannot bind metrics listener {format_address((host, port))}: "
                    f"{exc.strerror or exc}") from None

    # -- the native transport ----------------------------------------------------------------

    def _native_methods(self, loop: asyncio.AbstractEventLoop, health_check: NativeHealth,
                        ) -> dict[str, _NativeMethod]:
        """The method table for the native transport, from the same `_handlers()`."""
        methods: dict[str, _NativeMethod] = {
            _HEALTH_CHECK: ("unary", _native.unary_handler(health_check.check, None, loop),
                            True, False, None),
            # As on grpcio, a watch neither counts as a stream nor holds a drain.
            _HEALTH_WATCH: ("server_streaming", health_check.watch, False, False, None)}
        metrics = self._server_metrics

        def enter() -> bool:
            # The transport counts the stream itself (`active_streams`); the metrics count
            # what `_enter_stream` counts on grpcio.
            if self._draining:
                return False
            if metrics is not None:
                metrics.stream_started()
            return True

        leave = metrics.stream_ended if metrics is not None else None
        timeout = self.config.stream_idle_timeout
        idle = None if timeout is None else (timeout, idle_message(timeout))
        unservable = self._native_unservable()
        if unservable is not None:
            raise ConfigError(f"{unservable}: use transport='grpcio'")
        for service, handlers in self._handlers():
            assert not isinstance(handlers, grpc.GenericRpcHandler)
            for name, handler in handlers.items():
                path = f"/{service}/{name}"
                parts = getattr(handler.stream_stream, "calloutkit_parts", None)
                unary = getattr(handler.unary_unary, "calloutkit_answer", None)
                if parts is not None:
                    new_context, answer, parse, end_idle_on_drain, off_loop = parts
                    methods[path] = ("bidi", _native.stream_opener(
                        new_context, answer, parse, enter, leave, loop, self._pool, off_loop),
                        True, end_idle_on_drain, idle)
                elif unary is not None and not self.config.metrics:
                    # No per-call accounting here: the transport counts its calls itself
                    # (`active_streams`); with metrics, the calls are counted on the loop.
                    methods[path] = ("unary", _native.unary_driver(
                        unary, lambda: self._draining, loop, self._pool), True, False, None)
                else:
                    methods[path] = ("unary", _native.unary_handler(
                        handler.unary_unary, handler.request_deserializer, loop), True, False,
                        None)
        if self.config.reflection:
            methods.update(self._native_reflection(loop))
        return methods

    def _native_reflection(self, loop: asyncio.AbstractEventLoop) -> dict[str, _NativeMethod]:
        """grpcio-reflection's own servicer, asked one request at a time (its answer to a
        request depends on that request alone). As on grpcio, a reflection stream is not
        counted, not refused while draining, and not idle-timed."""
        from grpc_reflection.v1alpha import reflection, reflection_pb2

        names = [*(service for service, _ in self._handlers()), health.SERVICE_NAME,
                 reflection.SERVICE_NAME]
        servicer = reflection.ReflectionServicer(names)
        path = f"/{reflection.SERVICE_NAME}/ServerReflectionInfo"
        malformed = MalformedInput(logger, "malformed request")

        def parse(data: bytes, context: Any) -> Any:
            try:
                return reflection_pb2.ServerReflectionRequest.FromString(data)
            except Exception as exc:
                raise malformed(f"{path}: malformed request ({describe(exc)})") from None

        def answer(request: Any, context: Any) -> Any:
            return next(iter(servicer.ServerReflectionInfo((request,), context)))

        opener = _native.stream_opener(lambda context: context, answer, parse, lambda: True,
                                       None, loop, self._pool, False)
        return {path: ("bidi", opener, False, False, None)}

    def _native_unservable(self) -> str | None:
        """Why the native transport cannot serve this server's methods; None when it can.
        It serves bidi streams made by `_stream_function` and unary methods taking bytes."""
        for service, handlers in self._handlers():
            if isinstance(handlers, grpc.GenericRpcHandler):
                return (f"{type(self).__name__} serves methods the native transport cannot "
                        "(a catch-all handler)")
            for name, handler in handlers.items():
                if getattr(handler.stream_stream, "calloutkit_parts", None) is not None:
                    continue
                if handler.unary_unary is None or handler.response_serializer is not None:
                    return (f"{type(self).__name__}: /{service}/{name} is a kind of method "
                            "the native transport does not serve")
        return None

    def _auto_falls_back(self) -> bool:
        """Whether transport=auto, having chosen native, must serve on grpcio: this server's
        methods are ones the native transport cannot serve (a proxy's catch-all handler)."""
        if not self.config.transport_auto:
            return False
        unservable = self._native_unservable()
        if unservable is not None:
            logger.info("transport=auto: serving on grpcio, %s", unservable)
            return True
        return False

    async def _start_native(self) -> None:
        from calloutkit_native import Server

        cfg = self.config
        loop = asyncio.get_running_loop()
        self._health_names = ["", *(service for service, _ in self._handlers())]
        self._native_health = NativeHealth(self._health_names, self._healthy,
                                           MalformedInput(logger, "malformed request"))
        methods = self._native_methods(loop, self._native_health)
        # As `_grpc_options` does for grpcio: with workers, GOAWAY after an age (jittered by
        # the transport), then the grace period for the streams in flight.
        age = _CONNECTION_AGE_MS / 1000 if cfg.workers > 1 else None
        server = Server(methods, cfg.max_message_size, _NATIVE_MAX_STREAMS, age,
                        cfg.grace_period)
        reuse_port = cfg.workers > 1
        try:
            for address, tls, what in (
                    (cfg.plaintext_address, False, "plaintext"),
                    (cfg.secure_address, True, "TLS")):
                if address is None:
                    continue
                if is_unix(address):
                    # The same refusals as on grpcio: a regular file, a live socket, no folder.
                    _check_bindable(address, what, reuse_port=reuse_port)
                try:
                    port = server.listen(address[0], address[1], reuse_port,
                                         cfg.cert_chain if tls else None,
                                         cfg.private_key if tls else None,
                                         cfg.client_ca if tls else None,
                                         cfg.require_client_auth)
                except OSError as exc:
                    raise ConfigError(f"cannot bind {what} listener {format_address(address)}: "
                                      f"{exc.strerror or exc}") from None
                except ValueError as exc:  # a certificate or key rustls cannot use
                    raise ConfigError(f"TLS listener {format_address(address)}: {exc}") from None
                if is_unix(address):
                    port = 1  # what grpc's add_*_port answers for a unix socket
                if tls:
                    self.secure_port = port
                else:
                    self.plaintext_port = port
            server.start()
            self._native = server
            await self._start_http_health()
        except BaseException:
            server.stop()
            self._native = None
            raise
        self._started_serving()

    def _bind(self, server: grpc.aio.Server, address: tuple[str, int],
              creds: grpc.ServerCredentials | None, what: str) -> int:
        target = format_address(address)
        _check_bindable(address, what, reuse_port=self.config.workers > 1)
        try:
            port = (server.add_secure_port(target, creds) if creds is not None
                    else server.add_insecure_port(target))
        except RuntimeError as exc:
            raise ConfigError(f"cannot bind {what} listener {target}: {exc}") from None
        if port == 0:
            raise ConfigError(f"cannot bind {what} listener {target}: address in use or invalid")
        return int(port)

    async def _stop_http(self) -> None:
        if self._http_health is not None:
            await self._http_health.stop()
        if self._server_metrics is not None:
            if self._server_metrics.listener is not None:
                await self._server_metrics.listener.stop()
            self._server_metrics.close()

    def _health_tls(self) -> ssl.SSLContext:
        assert self._tls is not None
        return self._tls.health_context()

    def reload_certificates(self) -> bool:
        """Re-read the TLS certificate, key and client CA files (what SIGHUP does).

        New connections get the new certificate; connections already open, and their
        streams, carry on. Unreadable or mismatched files are logged and the current
        certificate stays. Returns True when the new files are in use.
        """
        if self._tls is None:
            return False
        if self._native is not None:
            return self._tls.reload(self._native.reload_tls)
        return self._tls.reload()

    # -- metrics (docs/observability.md) ------------------------------------------------------

    @property
    def metrics_listener_port(self) -> int | None:
        """The port of the ``metrics_address`` listener once started; None without one."""
        return None if self._server_metrics is None else self._server_metrics.port

    async def _metrics_middleware(self, call: Any, proceed: Callable[[], Any]) -> Any:
        metrics = self._server_metrics
        if metrics is None:  # not started: an in-process client, or plain code
            return await proceed()
        return await metrics.middleware(call, proceed)

    def _error_policy_name(self) -> str | None:
        """The error policy's name (``fail_closed``, ...); None for a kind without one."""
        return getattr(getattr(self, "error_policy", None), "value", None)

    def _start_metrics(self) -> None:
        from ._metrics import ServerMetrics

        metrics = ServerMetrics(self.protocol, self._error_policy_name())
        self._server_metrics = metrics
        enter, leave = self._enter_stream, self._leave_stream

        def enter_counted() -> bool:
            if not enter():
                return False
            metrics.stream_started()
            return True

        def leave_counted() -> None:
            metrics.stream_ended()
            leave()

        self._enter_stream = enter_counted  # type: ignore[method-assign]
        self._leave_stream = leave_counted  # type: ignore[method-assign]
        metrics.refresh_every_second(asyncio.get_running_loop(), self._metrics_state)

    def _metrics_state(self) -> tuple[bool, int, int, int]:
        pool = self._pool
        return self._stopping, pool.busy, pool.stuck, pool.size

    def _scrape(self) -> tuple[bytes, str]:
        assert self._server_metrics is not None
        self._server_metrics.refresh(*self._metrics_state())
        return self._server_metrics.exposition()

    def _listening(self) -> list[str]:
        cfg, out = self.config, []
        if self.secure_port is not None and cfg.secure_address is not None:
            out.append(f"grpc+tls {format_address((cfg.secure_address[0], self.secure_port))}")
        if self.plaintext_port is not None and cfg.plaintext_address is not None:
            out.append(
                f"grpc {format_address((cfg.plaintext_address[0], self.plaintext_port))}")
        if self.health_check_port is not None and cfg.health_check_address is not None:
            scheme = "https" if cfg.secure_health_check else "http"
            host = cfg.health_check_address[0]
            out.append(f"health {scheme}://{format_address((host, self.health_check_port))}")
        if self.metrics_listener_port is not None and cfg.metrics_address is not None:
            address = format_address((cfg.metrics_address[0], self.metrics_listener_port))
            out.append(f"metrics http://{address}/metrics")
        return out

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop. Streams in flight get ``grace`` seconds (default: the config's)."""
        if not self._started or self._stopped is None:
            return
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._drain(
                self.config.grace_period if grace is None else grace))
        await asyncio.shield(self._stop_task)

    async def _drain(self, grace: float) -> None:
        assert self._started and self._stopped is not None and self._idle is not None
        self._stopping = True
        if self._health_servicer is not None:
            await self._health_servicer.enter_graceful_shutdown()
        if self._native_health is not None:
            self._native_health.changed()
        delay = self.config.drain_delay
        if delay > 0:
            # A load balancer only learns of the stop from its next health check; until it
            # has, it still sends streams here, and refusing them would fail requests.
            logger.info("health is NOT_SERVING; new streams are still served for %gs "
                        "(drain_delay)", delay)
            await asyncio.sleep(delay)
        self._draining = True
        logger.info("draining: %d stream(s) in flight, grace %.1fs", self.active_streams, grace)
        # A stream waiting for its next message (Envoy waits on the upstream meanwhile) could
        # hold the drain for the whole grace period; only streams mid-callback get the grace.
        for watch in list(self._watches):
            watch.end(grpc.StatusCode.UNAVAILABLE, "server is draining")
        if self._native is not None:
            self._native.drain()
            # The transport counts its streams on its own thread: poll it.
            deadline = time.monotonic() + grace
            while self.active_streams and time.monotonic() < deadline:
                await asyncio.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
        elif self._active_streams > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=grace)
        if self.active_streams:
            logger.warning("grace period over: cancelling %d stream(s)", self.active_streams)
        if self._native is not None:
            self._native.stop()
        if self._grpc is not None:
            await self._grpc.stop(0)
        await self._stop_http()
        self._pool.shutdown()
        self._serving = False
        logger.info("stopped")
        self._stopped.set()

    async def wait_closed(self) -> None:
        """Wait until the server has stopped."""
        if self._stopped is not None:
            await self._stopped.wait()

    async def serve(self) -> None:
        """Start, then wait until something calls `stop` or `shutdown`."""
        await self.start()
        await self.wait_closed()

    def shutdown(self) -> None:
        """Ask the server to drain and stop; safe from any thread, and before `run` starts."""
        self._shutdown_requested = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._begin_stop)

    def _begin_stop(self) -> None:
        if self._started and self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._drain(self.config.grace_period))

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT or `shutdown`; blocking.

        The first signal drains (health goes NOT_SERVING, new streams are still served for
        ``drain_delay`` seconds, streams in flight finish within the grace period) and `run`
        returns; a second signal exits the process at once. With
        ``workers > 1`` this process becomes a supervisor of that many forked workers. The
        loop is uvloop's when it is installed (``event_loop="auto"``, the default).
        """
        if self.config.workers > 1:
            from ._workers import supervise

            self._check_ports_unshared()
            code = supervise(self.config.workers, self._run_loop,
                             metrics=self.config.metrics)
            if code:
                raise SystemExit(code)
            return
        self._run_loop()

    def _check_ports_unshared(self) -> None:
        """Refuse to start workers on a port that another process's listener holds.

        Workers bind with SO_REUSEPORT, so they would join the listeners of an earlier
        generation still running (its supervisor killed, say) and share its connections
        without a word. A probe without SO_REUSEPORT fails while any listener holds the port.
        A lock file would miss a port held by anything but calloutkit, and could go stale.
        """
        cfg = self.config
        for address, what in ((cfg.plaintext_address, "plaintext"), (cfg.secure_address, "TLS"),
                              (cfg.health_check_address, "health check")):
            if address is not None:
                try:
                    _check_bindable(address, what, reuse_port=False)
                except ConfigError as exc:
                    raise ConfigError(f"{exc} (workers of an earlier run still serving?)"
                                      ) from None

    def _run_loop(self) -> None:
        factory = None
        if self.config.event_loop == "uvloop":
            import uvloop

            factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(self._run_with_signals())

    async def _run_with_signals(self) -> None:
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        await self.serve()

    def _on_sighup(self) -> None:
        """SIGHUP: re-read the TLS files. A server kind that reloads more extends this."""
        if self._tls is not None:
            logger.info("SIGHUP: reloading TLS certificates")
            self.reload_certificates()

    def _on_signal(self, sig: int) -> None:
        if self._stop_task is not None or self._draining:
            logger.warning("second %s: exiting now", signal.Signals(sig).name)
            os._exit(128 + sig)
        logger.info("%s: draining (send it again to exit at once)", signal.Signals(sig).name)
        self._begin_stop()


