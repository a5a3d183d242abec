"""Conformance of the calloutkit.proxy library: every case of the reference list.

Each test runs a real gRPC proxy (a ``grpc.aio`` server with a `TransparentHandler`) in front
of real backends serving the small test service, all over loopback. Unary cases run in both
modes: "stream" (every call proxied as a bidi stream) and "unary_fast" (the unary fast path).
After every test no asyncio task may be left and no backend call may still be open.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from proxy_testservice import (
    BIG,
    EchoBackend,
    early_end_outcomes,
    no_leftovers,  # noqa: F401 (autouse: no task left behind)
    protos,
)

from calloutkit.proxy import (
    ChannelPool,
    Destination,
    MirrorPolicy,
    Overflow,
    Peeker,
    ProxyError,
    StreamParameters,
    TransparentHandler,
    handle_stream,
    register_service,
    register_stream_handlers,
)
from calloutkit.proxy._wire import fields

pb, pb_grpc = protos()
MODES = ["stream", "unary_fast"]
UNARY = ["/echo.Echo/Unary", "/echo.Admin/Stats"]
Code = grpc.StatusCode


# -- fixtures ---------------------------------------------------------------------------------



class Backends:
    """Named EchoBackends, started on demand and stopped (checked idle) at the end."""

    def __init__(self) -> None:
        self.started: dict[str, EchoBackend] = {}

    async def __call__(self, name: str = "a") -> EchoBackend:
        if name not in self.started:
            self.started[name] = await EchoBackend(name).start()
        return self.started[name]

    async def close(self) -> None:
        for backend in self.started.values():
            for _ in range(200):
                if backend.active == 0:
                    break
                await asyncio.sleep(0.01)
            assert backend.active == 0, f"backend {backend.name}: calls still open"
            backend.release.set()
            await backend.stop()


@pytest.fixture
async def backends() -> AsyncIterator[Backends]:
    pool = Backends()
    yield pool
    await pool.close()


@pytest.fixture
def mode() -> str:
    return "stream"


class Proxy:
    """A grpc.aio server with a TransparentHandler whose director the test sets."""

    def __init__(self, mode: str) -> None:
        self.director: Callable[..., Any] | None = None
        self.director_calls = 0
        self.pool = ChannelPool()
        self.handler = TransparentHandler(self._direct, channels=self.pool,
                                          unary_methods=UNARY if mode == "unary_fast" else ())
        self.server: grpc.aio.Server | None = None
        self.channel: grpc.aio.Channel | None = None

    async def _direct(self, method: str, context: Any, peeker: Peeker) -> Any:
        self.director_calls += 1
        assert self.director is not None, "test set no director"
        result = self.director(method, context, peeker)
        return await result if asyncio.iscoroutine(result) else result

    async def start(self, register: Callable[[grpc.aio.Server], None] | None = None) -> Proxy:
        server = grpc.aio.server(options=BIG)
        if register is not None:
            register(server)
        server.add_generic_rpc_handlers((self.handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.server = server
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=BIG)
        self.target = f"127.0.0.1:{port}"
        return self

    @property
    def echo(self) -> Any:
        return pb_grpc.EchoStub(self.channel)

    @property
    def admin(self) -> Any:
        return pb_grpc.AdminStub(self.channel)

    def raw(self, method: str) -> Any:
        assert self.channel is not None
        return self.channel.stream_stream(method, None, None)

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.server is not None:
            await self.server.stop(0)
        await self.pool.aclose()


@pytest.fixture
async def proxy(mode: str) -> AsyncIterator[Proxy]:
    p = await Proxy(mode).start()
    yield p
    await p.stop()


def to(backend: EchoBackend, **kw: Any) -> StreamParameters:
    return StreamParameters(Destination(backend.target), **kw)


def ping(value: str = "hello", counter: int = 0, **kw: Any) -> Any:
    return pb.Ping(value=value, counter=counter, **kw)


async def rpc_error(awaitable: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value


# -- 7.1 / 7.2 / 7.3: mwitkow handler and proxy tests ----------------------------------------

@pytest.mark.parametrize("mode", MODES)
async def test_carries_client_metadata(proxy: Proxy, backends: Backends) -> None:
    a = await backends()
    proxy.director = lambda m, c, p: to(a)
    reply = await proxy.echo.Unary(ping("foo", 42), metadata=[("injected_metadata", "v"),
                                                              ("bin-bin", b"\x00\xff")])
    assert (reply.value, reply.counter, reply.backend) == ("foo", 42, "a")
    seen = a.calls[-1].metadata
    assert seen["injected_metadata"] == "v"
    assert seen["bin-bin"] == b"\x00\xff"


@pytest.mark.parametrize("mode", MODES)
async def test_carries_client_metadata_stress(proxy: Proxy, backends: Backends) -> None:
    a = await backends()
    proxy.director = lambda m, c, p: to(a)
    for i in range(50):
        reply = await proxy.echo.Unary(ping("foo", i), metadata=[("injected_metadata", str(i))])
        assert reply.counter == i
        assert a.calls[-1].metadata["injected_metadata"] == str(i)
    assert len(a.calls) == 50


@pytest.mark.parametrize("mode", MODES)
async def test_carries_server_headers_and_trailers(proxy: Proxy, backends: Backends) -> None:
    a = await backends()
    proxy.director = lambda m, c, p: to(a)
    call = proxy.echo.Unary(ping("x"), metadata=[
        ("x-header", "injected_header=header_value,ping-header=Arbitrary header text"),
        ("x-trailer", "injected_trailer=trailer_value")])
    reply = await call
    assert reply.value == "x"
    headers = dict(await call.initial_metadata())
    assert headers == {"injected_header": "header_value",
                       "ping-header": "Arbitrary header text"}
    assert list(await call.trailing_metadata()) == [("injected_trailer", "trailer_value")]


@pytest.mark.parametrize("mode", MODES)
async def test_app_error_propagates(proxy: Proxy, backends: Backends) -> None:
    a = await backends()
    proxy.director = lambda m, c, p: to(a)
    for code, details in [("FAILED_PRECONDITION", "Userspace error."),
                          ("RESOURCE_EXHAUSTED", "service error")]:
        err = await rpc_error(proxy.echo.Unary(ping(), metadata=[("x-fail", f"{code}:{details}")]))
        assert (err.code(), err.details()) == (getattr(Code, code), details)


@pytest.mark.parametrize("mode", MODES)
async def test_director_error_propagates(proxy: Proxy, backends: Backends) -> None:
    a = await backends()
    finalized: list[int] = []

    async def finalizer() -> None:
        finalized.append(1)

    def director(method: str, context: Any, peeker: Peeker) -> StreamParameters:
        if dict(context.invocation_metadata()).get("reject-me"):
            raise ProxyError(Code.PERMISSION_DENIED, "testing rejection")
        return to(a, req_finalizer=finalizer)

    proxy.director = director
    err = await rpc_error(proxy.echo.Unary(ping(), metadata=[("reject-me", "1")]))
    assert (err.code(), err.details()) == (Code.PERMISSION_DENIED, "testing rejection")
    assert a.calls == [] and finalized == []
    # the same director lets other calls through
    assert (await proxy.echo.Unary(ping("ok"))).value == "ok"
    assert finalized == [1]


async def _failed_call(proxy: Proxy, backend: EchoBackend, code: str, details: str) -> Any:
    """The AioRpcError of a real call to ``backend`` that fails with ``code``/``details``."""
    call = proxy.pool.get(backend.target).unary_unary("/echo.Echo/Unary", None, None)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(ping().SerializeToString(), metadata=[("x-fail", f"{code}:{details}")])
    assert "debug_error_string" in str(info.value)
    return info.value


class _Refused(grpc.RpcError):
    """A grpc.RpcError with a status, as a gRPC library outside grpc.aio raises it."""

    def code(self) -> grpc.StatusCode:
        return Code.RESOURCE_EXHAUSTED

    def details(self) -> str:
        return "quota used up"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["aio_rpc_error", "rpc_error", "abort", "plain"])
async def test_director_status_error_keeps_its_code(proxy: Proxy, backends: Backends,
                                                   kind: str) -> None:
    a = await backends()

    async def director(method: str, context: Any, peeker: Peeker) -> StreamParameters:
        if kind == "aio_rpc_error":  # e.g. an auth lookup the director made failed
            raise await _failed_call(proxy, a, "NOT_FOUND", "no such tenant")
        if kind == "rpc_error":
            raise _Refused()
        if kind == "abort":
            await context.abort(Code.PERMISSION_DENIED, "aborted by director")
        raise RuntimeError("secret text")

    proxy.director = director
    err = await rpc_error(proxy.echo.Unary(ping()))
    assert (err.code(), err.details()) == {
        "aio_rpc_error": (Code.NOT_FOUND, "no such tenant"),
        "rpc_error": (Code.RESOURCE_EXHAUSTED, "quota used up"),
        "abort": (Code.PERMISSION_DENIED, "aborted by director"),
        "plain": (Code.INTERNAL, "proxy director failed")}[kind]
    assert len(a.calls) == (1 if kind == "aio_rpc_error" else 0)  # only the director's own


async def _full_duplex(proxy: Proxy, n: int = 20) -> None:
    call = proxy.echo.Bidi(metadata=[("x-trailer", "injected_trailer=trailer_value"),
                                     ("x-header", "injected_header=header_value")])
    for i in range(n):
        await call.write(ping(f"foo:{i}", i))
        reply = await call.read()
        assert (reply.value, reply.counter) == (f"foo:{i}", i)
        if i == 0:
            assert dict(await call.initial_metadata()) == {"injected_header": "header_value"}
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == Code.OK
    assert list(await call.trailing_metadata()) == [("injected_trailer", "trailer_value")]


async def test_full_duplex(proxy: Proxy, backends: Backends) -> None:
    a = await backends()
    proxy.director = lambda m, c, p: to(a)
    await _full_duplex(proxy, 25)


async def test_full_duplex_stress(proxy: Proxy, backends: Backends) -> None:
    a = await backends()
    proxy.director = lambda m, c, p: to(a)
    for _ in range(50):
        await _full_duplex(proxy)
    assert len(a.calls) == 50


async def test_server_streaming(proxy: Proxy, backends: Backends) -> None:
    a = await backends()
    proxy.director = lambda m, c, p: to(a)
    call = proxy.echo.ServerStream(ping("v", 7), metadata=[("x-header", "ping-header=h"),
                                                         ("x-trailer", "ping-trailer=t")])
    replies = [r async for r in call]
    assert [r.count for r in replies] == list(range(7))
    assert all(r.value == "v" for r in replies)
    assert dict(await call.initial_metadata()) == {"ping-header": "h"}
    assert dict(await call.trailing_metadata()) == {"ping-trailer": "t"}


@pytest.mark.parametrize("mode", MODES)
async def test_unary_with_echo_header(proxy: Proxy, backends: Backends) -> None:
    a = await backends()
    proxy.director = lambda m, c, p: to(a)
    call = proxy.echo.Unary(ping(), metadata=[("test-client-header", "value"),
                                              ("test-client-bin", b"\x01\x02")])
    await call
    headers = dict(await call.initial_metadata())
    assert headers == {"test-client-header": "value", "test-client-bin": b"\x01\x02"}


async def test_raw_bytes_roundtrip(proxy: Proxy, backends: Backends) -> None:
    """E10: frames are exact bytes, not protobuf: nothing is re-serialized."""
    a = await backends()
    proxy.director = lambda m, c, p: to(a)
    frames = [bytes.fromhex("DEADBEEF"), b"\x55", b"", bytes(range(256)) * 10]
    call = proxy.raw("/raw.Raw/Echo")()
    for frame in frames:
        await call.write(frame)
        assert await call.read() == frame
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert a.calls[-1].requests == frames


# -- 7.4: Gitaly handler_ext_test --------------------------------------------------------------

async def test_register_stream_handlers(backends: Backends) -> None:
    """single handler; multiple handlers pick the right one; unregistered -> director."""
    counts = {"UnaryCall": 0, "EmptyCall": 0}

    def local(name: str) -> Callable[[Any, Any], Any]:
        async def handler(request_iterator: Any, context: Any) -> None:
            counts[name] += 1
            frame = await context.read()
            await context.write(b"local:" + (frame or b""))
        return handler

    proxy = Proxy("stream")
    proxy.director = lambda m, c, p: (_ for _ in ()).throw(
        ProxyError(Code.UNKNOWN, "director was called"))
    await proxy.start(lambda server: register_stream_handlers(
        server, "grpc.testing.TestService",
        {"UnaryCall": local("UnaryCall"), "EmptyCall": local("EmptyCall")}))
    try:
        assert await proxy.raw("/grpc.testing.TestService/UnaryCall")(iter([b"x"])).read() \
            == b"local:x"
        assert counts == {"UnaryCall": 1, "EmptyCall": 0}
        assert await proxy.raw("/grpc.testing.TestService/EmptyCall")(iter([b""])).read() \
            == b"local:"
        assert counts == {"UnaryCall": 1, "EmptyCall": 1}
        call = proxy.raw("/grpc.testing.TestService/StreamingCall")(iter([b"x"]))
        err = await rpc_error(call.read())
        assert (err.code(), err.details()) == (Code.UNKNOWN, "director was called")
        assert counts == {"UnaryCall": 1, "EmptyCall": 1}
        assert proxy.director_calls == 1
    finally:
        await proxy.stop()


async def test_register_service(backends: Backends) -> None:
    """A registered method is proxied; another method of the service reaches the catch-all."""
    a = await backends()
    seen: list[str] = []

    def registered(method: str, context: Any, peeker: Peeker) -> StreamParameters:
        seen.append("registered:" + method)
        return to(a)

    proxy = Proxy("stream")
    proxy.director = lambda m, c, p: (_ for _ in ()).throw(
        ProxyError(Code.UNKNOWN, "director was called"))
    await proxy.start(lambda server: register_service(
        server, registered, "echo.Echo", ["Unary"], unary_methods=["Unary"],
        channels=proxy.pool))
    try:
        assert (await proxy.echo.Unary(ping("r"))).value == "r"
        assert seen == ["registered:/echo.Echo/Unary"] and proxy.director_calls == 0
        err = await rpc_error(proxy.echo.ClientStream(iter([ping()])))
        assert (err.code(), err.details()) == (Code.UNKNOWN, "director was called")
        assert proxy.director_calls == 1 and a.methods() == ["/echo.Echo/Unary"]
    finally:
        await proxy.stop()


# -- 7.5: Gitaly TestProxyErrorPropagation -----------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
async def test_finalizer_error_propagates(proxy: Proxy, backends: Backends) -> None:
    a = await backends()
    ran: list[int] = []

    async def finalizer() -> None:
        ran.append(1)
        raise ProxyError(Code.INTERNAL, "request finalizer error")

    proxy.director = lambda m, c, p: to(a, req_finalizer=finalizer)
    err = await rpc_error(proxy.echo.Unary(ping()))
    assert (err.code(), err.details()) == (Code.INTERNAL, "request finalizer error")
    assert ran == [1] and len(a.calls) == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("expose", [False, True])
async def test_proxy_errors_carry_no_exception_text_unless_exposed(proxy: Proxy,
                                                                   backends: Backends,
                                                                   expose: bool) -> None:
    """The proxy's own statuses name no address and no exception text by default; a
    finalizer's or an err_handler's exception is only logged."""
    a = await backends()
    proxy.handler.expose_errors = expose

    def finalizer() -> None:
        raise ValueError("db at 10.9.8.7:5432 refused")

    def handler(exc: BaseException) -> BaseException:
        return KeyError("secret-key-name")

    proxy.director = lambda m, c, p: to(a, req_finalizer=finalizer)
    err = await rpc_error(proxy.echo.Unary(ping()))
    assert err.code() == Code.INTERNAL
    assert err.details() == ("request finalizer failed: db at 10.9.8.7:5432 refused" if expose
                             else "request finalizer failed")
    proxy.director = lambda m, c, p: StreamParameters(Destination(
        a.target, err_handler=handler, metadata=[("x-fail", "NOT_FOUND:gone")]))
    err = await rpc_error(proxy.echo.Unary(ping()))
    assert (err.code(), err.details()) == (Code.INTERNAL,
                                           "'secret-key-name'" if expose else "proxy error")


@pytest.mark.parametrize("mode", MODES)
async def test_finalizer_grpc_error_keeps_code_and_details(proxy: Proxy,
                                                           backends: Backends) -> None:
    a = await backends()

    async def finalizer() -> None:  # e.g. recording the call in a service that failed
        raise await _failed_call(proxy, a, "ABORTED", "vote lost")

    proxy.director = lambda m, c, p: to(a, req_finalizer=finalizer)
    err = await rpc_error(proxy.echo.Unary(ping()))
    assert (err.code(), err.details()) == (Code.ABORTED, "vote lost")


@pytest.mark.parametrize("mode", MODES)
async def test_backend_error_beats_finalizer_error(proxy: Proxy, backends: Backends) -> None:
    a = await backends()

    def finalizer() -> None:
        raise ProxyError(Code.INTERNAL, "request finalizer error")

    proxy.director = lambda m, c, p: to(a, req_finalizer=finalizer)
    err = await rpc_error(proxy.echo.Unary(
        ping(), metadata=[("x-fail", "INVALID_ARGUMENT:backend error")]))
    assert (err.code(), err.details()) == (Code.INVALID_ARGUMENT, "backend error")


@pytest.mark.parametrize("mode", MODES)
async def test_err_handler_gets_error(proxy: Proxy, backends: Backends) -> None:
    a = await backends()
    got: list[BaseException] = []

    def handler(exc: BaseException) -> BaseException:
        got.append(exc)
        return ProxyError(Code.ABORTED, f"handled: {exc.details()}")  # type: ignore[attr-defined]

    proxy.director = lambda m, c, p: StreamParameters(Destination(a.target, err_handler=handler))
    err = await rpc_error(proxy.echo.Unary(ping(), metadata=[("x-fail", "INTERNAL:boom")]))
    assert (err.code(), err.details()) == (Code.ABORTED, "handled: boom")
    assert len(got) == 1 and got[0].code() == Code.INTERNAL  # type: ignore[attr-defined]


async def test_err_handler_can_swallow_stream(proxy: Proxy, backends: Backends) -> None:
    """Generic path: a swallowed primary error ends the call OK (zero messages here)."""
    a = await backends()
    proxy.director = lambda m, c, p: StreamParameters(
        Destination(a.target, err_handler=lambda exc: None))
    call = proxy.echo.ServerStream(ping(counter=3), metadata=[("x-fail", "INTERNAL:boom")])
    assert [r async for r in call] == []
    assert await call.code() == Code.OK
    # a Python unary client sees None for "OK, no message" (Q8)
    assert await proxy.echo.Unary(ping(), metadata=[("x-fail", "INTERNAL:boom")]) is None


async def test_err_handler_cannot_swallow_on_unary_fast_path(backends: Backends) -> None:
    """E8: on the fast path None keeps the error; bytes are a substitute response."""
    a = await backends()
    proxy = await Proxy("unary_fast").start()
    try:
        proxy.director = lambda m, c, p: StreamParameters(
            Destination(a.target, err_handler=lambda exc: None))
        err = await rpc_error(proxy.echo.Unary(ping(), metadata=[("x-fail", "INTERNAL:boom")]))
        assert (err.code(), err.details()) == (Code.INTERNAL, "boom")
        substitute = pb.Pong(value="substitute").SerializeToString()
        proxy.director = lambda m, c, p: StreamParameters(
            Destination(a.target, err_handler=lambda exc: substitute))
        reply = await proxy.echo.Unary(ping(), metadata=[("x-fail", "INTERNAL:boom")])
        assert reply.value == "substitute"
    finally:
        await proxy.stop()


@pytest.mark.parametrize("mode", MODES)
async def test_err_handler_substitute_response(proxy: Proxy, backends: Backends) -> None:
    """A primary err_handler may answer for the failed backend, on either path."""
    a = await backends()
    substitute = pb.Pong(value="substitute").SerializeToString()
    proxy.director = lambda m, c, p: StreamParameters(
        Destination(a.target, err_handler=lambda exc: substitute))
    call = proxy.echo.Unary(ping(), metadata=[("x-fail", "INTERNAL:boom")])
    assert (await call).value == "substitute"
    assert await call.code() == Code.OK


@pytest.mark.parametrize("mode", MODES)
async def test_swallowed_error_surfaces_finalizer_error(proxy: Proxy, backends: Backends) -> None:
    a = await backends()
    substitute = pb.Pong(value="substitute").SerializeToString()

    def finalizer() -> None:
        raise ProxyError(Code.INTERNAL, "request finalizer error")

    proxy.director = lambda m, c, p: StreamParameters(
        Destination(a.target, err_handler=lambda exc: substitute), req_finalizer=finalizer)
    err = await rpc_error(proxy.echo.Unary(ping(), metadata=[("x-fail", "INTERNAL:boom")]))
    assert (err.code(), err.details()) == (Code.INTERNAL, "request finalizer error")


# -- 7.6: Gitaly TestFailDestinationWithError --------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
async def test_fail_destinations_nil_err_handlers(proxy: Proxy, backends: Backends) -> None:
    a, b = await backends("a"), await backends("b")
    proxy.director = lambda m, c, p: StreamParameters(
        Destination(a.target), [Destination(b.target)], wait_for_secondaries=True)
    err = await rpc_error(proxy.echo.Unary(ping(), metadata=[("x-fail", "INTERNAL:foo")]))
    assert (err.code(), err.details()) == (Code.INTERNAL, "foo")


@pytest.mark.parametrize("mode", MODES)
async def test_fail_destinations_calls_all_err_handlers(proxy: Proxy, backends: Backends) -> None:
    """E9: on a primary failure every secondary's err_handler hears "primary failed"."""
    a = await backends("a")
    seen: dict[str, list[BaseException]] = {"primary": [], "secondary": []}

    def recorder(name: str) -> Callable[[BaseException], BaseException]:
        def handler(exc: BaseException) -> BaseException:
            seen[name].append(exc)
            return exc
        return handler

    # The secondary blocks, so it is still running when the primary fails.
    proxy.director = lambda m, c, p: StreamParameters(
        Destination(a.target, err_handler=recorder("primary"),
                    metadata=[("x-fail", "INTERNAL:foo")]),
        [Destination(a.target, err_handler=recorder("secondary"), metadata=[("x-block", "1")])],
        wait_for_secondaries=True)
    err = await rpc_error(proxy.echo.Unary(ping()))
    assert (err.code(), err.details()) == (Code.INTERNAL, "foo")
    assert [e.code() for e in seen["primary"]] == [Code.INTERNAL]  # type: ignore[attr-defined]
    [cancelled] = seen["secondary"]
    assert isinstance(cancelled, ProxyError)
    assert (cancelled.code, cancelled.details) == (Code.CANCELLED, "primary failed")


async def test_fail_destinations_that_cannot_open() -> None:
    """Gitaly's failDestinationsWithError: when a stream cannot even be opened, every
    err_handler (primary and secondaries) gets the error and the call fails with it."""
    seen: list[tuple[str, BaseException]] = []

    def recorder(name: str) -> Callable[[BaseException], BaseException]:
        def handler(exc: BaseException) -> BaseException:
            seen.append((name, exc))
            return exc
        return handler

    async def local(request_iterator: Any, context: Any) -> None:
        # A target string without a ChannelPool cannot become a channel.
        await handle_stream(context, "/echo.Echo/Bidi", StreamParameters(
            Destination("127.0.0.1:1", err_handler=recorder("primary")),
            [Destination("127.0.0.1:1", err_handler=recorder("secondary"))],
            wait_for_secondaries=True))

    proxy = Proxy("stream")
    await proxy.start(lambda server: register_stream_handlers(server, "echo.Echo",
                                                              {"Bidi": local}))
    try:
        err = await rpc_error(proxy.echo.Bidi(iter([ping()])).read())
        # The client learns what failed; the handlers (server side) also hear why.
        assert (err.code(), err.details()) == (Code.INTERNAL, "initiate primary stream failed")
        assert [name for name, _ in seen] == ["primary", "secondary"]
        assert all(str(e) == str(seen[0][1]) for _, e in seen)
        assert "no ChannelPool" in str(seen[0][1]) and "127.0.0.1:1" in str(seen[0][1])
    finally:
        await proxy.stop()


# -- 7.7: Gitaly peeker_test ---------------------------------------------------------------------

async def test_stream_peeking(proxy: Proxy, backends: Backends) -> None:
    a = await backends()
    peeked: list[Any] = []

    async def director(method: str, context: Any, peeker: Peeker) -> StreamParameters:
        first = await peeker.peek()
        assert await peeker.peek() == first  # E3: idempotent
        peeked.append(pb.Ping.FromString(first))
        return to(a)

    proxy.director = director
    call = proxy.echo.Bidi()
    await call.write(ping("first", 1))
    assert (await call.read()).value == "first"
    await call.write(ping("second", 2))
    assert (await call.read()).value == "second"
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert [p.value for p in peeked] == ["first"]
    assert [r.value for r in a.calls[-1].requests] == ["first", "second"]


async def test_stream_injecting(proxy: Proxy, backends: Backends) -> None:
    a = await backends()

    async def director(method: str, context: Any, peeker: Peeker) -> StreamParameters:
        first = pb.Ping.FromString(await peeker.peek())
        first.value = "injected:" + first.value
        return StreamParameters(Destination(a.target, msg=first.SerializeToString()))

    proxy.director = director
    call = proxy.echo.Bidi()
    await call.write(ping("one"))
    assert (await call.read()).value == "injected:one"
    await call.write(ping("two"))
    assert (await call.read()).value == "two"
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert [r.value for r in a.calls[-1].requests] == ["injected:one", "two"]


# -- 7.8: Praefect coordinator error handling (primary + 2 secondaries) -----------------------

def _three(a: EchoBackend, b: EchoBackend, c: EchoBackend, *, fail: tuple[str, ...] = (),
           swallow: bool = False, hold_primary: bool = False) -> Callable[..., StreamParameters]:
    def dst(backend: EchoBackend) -> Destination:
        md = [("x-fail", f"INTERNAL:{backend.name} failed")] if backend.name in fail else []
        if hold_primary and backend is a:
            md.append(("x-block", "1"))
        return Destination(backend.target, metadata=md,
                           err_handler=(lambda exc: None) if swallow and backend is not a
                           else None)
    return lambda m, ctx, p: StreamParameters(dst(a), [dst(b), dst(c)],
                                              wait_for_secondaries=True)


async def _when_all_received(primary: EchoBackend, *others: EchoBackend) -> None:
    """Let the held primary answer once every other backend has its call (as in Praefect,
    where secondaries have the request before the primary's failure cancels them)."""
    for _ in range(500):
        if all(o.received for o in others) and primary.active:
            break
        await asyncio.sleep(0.01)
    primary.release.set()


@pytest.mark.parametrize("mode", MODES)
async def test_secondaries_all_called(proxy: Proxy, backends: Backends) -> None:
    a, b, c = await backends("a"), await backends("b"), await backends("c")
    proxy.director = _three(a, b, c)
    reply = await proxy.echo.Unary(ping("x"))
    assert reply.backend == "a"
    assert [len(x.calls) for x in (a, b, c)] == [1, 1, 1]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("failing", [("a",), ("a", "b")], ids=["secondaries-ok", "b-fails-too"])
async def test_primary_error_forwarded_whatever_the_secondaries_answer(
        proxy: Proxy, backends: Backends, failing: tuple[str, ...]) -> None:
    a, b, c = await backends("a"), await backends("b"), await backends("c")
    proxy.director = _three(a, b, c, fail=failing, hold_primary=True)
    call = proxy.echo.Unary(ping())
    await _when_all_received(a, b, c)
    err = await rpc_error(call)
    assert (err.code(), err.details()) == (Code.INTERNAL, "a failed")
    assert [len(x.received) for x in (a, b, c)] == [1, 1, 1]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["failing", "unreachable"])
async def test_failing_secondary_waited_swallowed(proxy: Proxy, backends: Backends,
                                                  kind: str) -> None:
    a, b, c = await backends("a"), await backends("b"), await backends("c")
    if kind == "unreachable":
        await c.stop()
    proxy.director = _three(a, b, c, fail=("c",), swallow=True)
    assert (await proxy.echo.Unary(ping())).backend == "a"
    # without the swallowing handler the same failure fails the call
    proxy.director = _three(a, b, c, fail=("c",))
    before = len(a.received), len(b.received)
    err = await rpc_error(proxy.echo.Unary(ping()))
    if kind == "unreachable":
        # like Praefect: UNAVAILABLE before any leg gets the request (no primary side effect)
        assert (err.code(), err.details()) == (
            Code.UNAVAILABLE, "initiate secondary stream: cannot connect")
        assert (len(a.received), len(b.received)) == before
        proxy.handler.expose_errors = True  # the address only when asked for
        err = await rpc_error(proxy.echo.Unary(ping()))
        assert (err.code(), err.details()) == (
            Code.UNAVAILABLE, f"initiate secondary stream: cannot connect to {c.target}")
    else:
        assert err.code() == Code.INTERNAL
        assert err.details().startswith("failed proxying to secondary: ")


# -- 7.9: routing, edge cases, mirroring ------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
async def test_route_by_peeked_field(proxy: Proxy, backends: Backends) -> None:
    a, b = await backends("a"), await backends("b")
    by_api = {"api-a": a, "api-b": b}

    async def director(method: str, context: Any, peeker: Peeker) -> StreamParameters:
        frame = await peeker.peek() or b""
        api_id = next((v for n, v in fields(frame, (3,)) if isinstance(v, bytes)), b"").decode()
        if api_id == "forbidden":
            raise ProxyError(Code.PERMISSION_DENIED, f"api {api_id} is not allowed")
        return to(by_api[api_id])

    proxy.director = director
    assert (await proxy.echo.Unary(ping(api_id="api-a"))).backend == "a"
    assert (await proxy.echo.Unary(ping(api_id="api-b"))).backend == "b"
    err = await rpc_error(proxy.echo.Unary(ping(api_id="forbidden")))
    assert err.code() == Code.PERMISSION_DENIED


@pytest.mark.parametrize("mode", MODES)
async def test_route_by_metadata_any_service(proxy: Proxy, backends: Backends) -> None:
    a, b = await backends("a"), await backends("b")
    proxy.director = lambda m, c, p: to(
        {"a": a, "b": b}[dict(c.invocation_metadata())["x-route"]])
    assert (await proxy.admin.Stats(ping(), metadata=[("x-route", "b")])).backend == "b"
    assert b.methods() == ["/echo.Admin/Stats"] and a.calls == []


async def test_unknown_method_status_from_backend(proxy: Proxy, backends: Backends) -> None:
    a = await backends()
    proxy.director = lambda m, c, p: to(a)
    err = await rpc_error(proxy.raw("/echo.Echo/NotAMethod")(iter([b""])).read())
    assert err.code() == Code.UNIMPLEMENTED


@pytest.mark.parametrize("mode", MODES)
async def test_unknown_backend_is_unimplemented(proxy: Proxy, backends: Backends) -> None:
    routes = {"a": await backends("a")}
    proxy.director = lambda m, c, p: (to(routes[key]) if (key := dict(
        c.invocation_metadata()).get("x-route")) in routes else None)
    err = await rpc_error(proxy.echo.Unary(ping(), metadata=[("x-route", "nope")]))
    assert (err.code(), err.details()) == (Code.UNIMPLEMENTED, "no route for /echo.Echo/Unary")


@pytest.mark.parametrize("mode", MODES)
async def test_unreachable_primary_is_unavailable(proxy: Proxy, backends: Backends) -> None:
    gone = await backends("gone")
    await gone.stop()
    proxy.director = lambda m, c, p: to(gone)
    err = await rpc_error(proxy.echo.Unary(ping()))
    assert err.code() == Code.UNAVAILABLE


async def test_client_streaming_half_close(proxy: Proxy, backends: Backends) -> None:
    a = await backends()
    proxy.director = lambda m, c, p: to(a)
    call = proxy.echo.ClientStream()
    for i in range(5):
        await call.write(ping(counter=i))
    await call.done_writing()
    assert (await call).count == 5


@pytest.mark.parametrize("peek", [False, True])
async def test_client_streaming_zero_messages(proxy: Proxy, backends: Backends,
                                              peek: bool) -> None:
    a = await backends()
    peeked: list[bytes | None] = []

    async def director(method: str, context: Any, peeker: Peeker) -> StreamParameters:
        if peek:
            peeked.append(await peeker.peek())
        return to(a)

    proxy.director = director
    reply = await proxy.echo.ClientStream(iter([]))
    assert (reply.count, reply.backend) == (0, "a")
    assert peeked == ([None] if peek else [])


async def test_header_before_first_message(proxy: Proxy, backends: Backends) -> None:
    """E1: headers the backend sends before any message reach the client at once."""
    a = await backends()
    proxy.director = lambda m, c, p: to(a)
    call = proxy.echo.Bidi(metadata=[("x-header", "early=yes")])
    headers = await asyncio.wait_for(call.initial_metadata(), timeout=2)
    assert dict(headers) == {"early": "yes"}
    await call.write(ping("after"))
    assert (await call.read()).value == "after"
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF


@pytest.mark.parametrize("mode", MODES)
async def test_header_survives_error(proxy: Proxy, backends: Backends) -> None:
    a = await backends()
    proxy.director = lambda m, c, p: to(a)
    err = await rpc_error(proxy.echo.Unary(ping(), metadata=[("x-header", "sent=before"),
                                                             ("x-fail", "INTERNAL:after")]))
    assert (err.code(), err.details()) == (Code.INTERNAL, "after")
    assert dict(err.initial_metadata()) == {"sent": "before"}


async def test_trailers_only_error_stays_trailers_only(proxy: Proxy, backends: Backends) -> None:
    a = await backends()
    proxy.director = lambda m, c, p: to(a)
    err = await rpc_error(proxy.echo.Unary(ping(), metadata=[("x-fail", "NOT_FOUND:nope"),
                                                             ("x-trailer", "why=because")]))
    assert err.code() == Code.NOT_FOUND
    assert dict(err.initial_metadata()) == {}
    assert dict(err.trailing_metadata()) == {"why": "because"}


async def test_error_after_messages_in_stream(proxy: Proxy, backends: Backends) -> None:
    a = await backends()
    proxy.director = lambda m, c, p: to(a)
    call = proxy.echo.ServerStream(ping(counter=5), metadata=[
        ("x-fail", "FAILED_PRECONDITION:late"), ("x-fail-after", "3")])
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for reply in call:
            got.append(reply.count)
    assert got == [0, 1, 2]
    assert (info.value.code(), info.value.details()) == (Code.FAILED_PRECONDITION, "late")


def _on_own_loop(loop_name: str, main: Callable[[], Any]) -> Any:
    """Run ``main()`` to completion on a fresh event loop of the named kind (in this thread)."""
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
async def test_backend_status_survives_ending_before_reading_the_request(loop_name: str) -> None:
    """A backend that ends the call (OK or an error) while the proxy still writes the client's
    stream to it: grpc.aio used to report INTERNAL "Internal error from Core" instead."""

    async def main() -> Any:
        backend = await EchoBackend("a").start()
        proxy = await Proxy("stream").start()
        proxy.director = lambda m, c, p: to(backend)
        try:
            return await asyncio.to_thread(early_end_outcomes, proxy.target)
        finally:
            await proxy.stop()
            await backend.stop()

    for expected, got in await asyncio.to_thread(_on_own_loop, loop_name, main):
        assert got == {expected: 150}, got


@pytest.mark.parametrize("method", ["ServerStream", "Bidi", "Unary"])
async def test_client_cancel_propagates(backends: Backends, method: str) -> None:
    a = await backends()
    proxy = await Proxy("unary_fast").start()  # Unary on the fast path, the rest generic
    proxy.director = lambda m, c, p: to(a)
    try:
        md = [("x-block", "1")]
        if method == "ServerStream":
            call = proxy.echo.ServerStream(ping(counter=1000), metadata=md)
        elif method == "Bidi":
            call = proxy.echo.Bidi(metadata=md)
            await call.write(ping())
        else:
            call = proxy.echo.Unary(ping(), metadata=md)
        for _ in range(200):
            if a.active:
                break
            await asyncio.sleep(0.01)
        assert a.active == 1
        call.cancel()
        for _ in range(300):
            if a.cancelled:
                break
            await asyncio.sleep(0.01)
        assert a.cancelled == [f"/echo.Echo/{method}"]
    finally:
        await proxy.stop()


@pytest.mark.parametrize("mode", MODES)
async def test_deadline_propagates(proxy: Proxy, backends: Backends) -> None:
    a = await backends()
    proxy.director = lambda m, c, p: to(a)
    await proxy.echo.Unary(ping(), timeout=5)
    remaining = a.calls[-1].time_remaining
    assert remaining is not None and 0 < remaining <= 5.05
    err = await rpc_error(proxy.echo.Unary(ping(), timeout=0.3, metadata=[("x-block", "1")]))
    assert err.code() == Code.DEADLINE_EXCEEDED
    for _ in range(300):
        if a.cancelled:
            break
        await asyncio.sleep(0.01)
    assert a.cancelled == ["/echo.Echo/Unary"]


@pytest.mark.parametrize("mode", MODES)
async def test_large_message(proxy: Proxy, backends: Backends) -> None:
    a = await backends()
    proxy.director = lambda m, c, p: to(a)
    blob = bytes(range(256)) * (8 * 1024 * 4)  # 8 MiB
    assert len(blob) == 8 * 1024 * 1024
    reply = await proxy.echo.Unary(ping(blob=blob))
    assert reply.blob == blob


@pytest.mark.parametrize("mode", MODES)
async def test_mirror_receives_copy(proxy: Proxy, backends: Backends) -> None:
    a, m = await backends("a"), await backends("mirror")
    policy = MirrorPolicy()
    proxy.director = lambda meth, c, p: StreamParameters(
        Destination(a.target), [Destination(m.target)], mirror=policy)
    assert (await proxy.echo.Unary(ping("u"))).backend == "a"
    call = proxy.echo.Bidi()
    for i in range(10):
        await call.write(ping(str(i), i))
        assert (await call.read()).backend == "a"
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    await policy.wait_idle()
    assert m.methods() == ["/echo.Echo/Unary", "/echo.Echo/Bidi"]
    assert [r.value for r in m.calls[1].requests] == [str(i) for i in range(10)]


@pytest.mark.parametrize("mode", MODES)
async def test_mirror_gets_rewritten_first_message(proxy: Proxy, backends: Backends) -> None:
    a, m = await backends("a"), await backends("mirror")
    policy = MirrorPolicy()

    async def director(method: str, context: Any, peeker: Peeker) -> StreamParameters:
        first = pb.Ping.FromString(await peeker.peek())
        first.value = "for-the-mirror"
        return StreamParameters(Destination(a.target),
                                [Destination(m.target, msg=first.SerializeToString())],
                                mirror=policy)

    proxy.director = director
    assert (await proxy.echo.Unary(ping("original"))).value == "original"
    await policy.wait_idle()
    assert [r.value for r in m.calls[0].requests] == ["for-the-mirror"]
    assert [r.value for r in a.calls[0].requests] == ["original"]


@pytest.mark.parametrize("mode", MODES)
async def test_mirror_not_waited_for(proxy: Proxy, backends: Backends) -> None:
    """E6: a mirror that is still busy costs the client nothing; wait mode waits for it."""
    a, m = await backends("a"), await backends("mirror")
    policy = MirrorPolicy()
    slow = Destination(m.target, metadata=[("x-block", "1")])
    proxy.director = lambda meth, c, p: StreamParameters(Destination(a.target), [slow],
                                                         mirror=policy)
    assert (await asyncio.wait_for(proxy.echo.Unary(ping()), 5)).backend == "a"
    # The client has its answer; the mirror's call may reach its backend just after.
    for _ in range(300):
        if m.active:
            break
        await asyncio.sleep(0.01)
    assert m.active == 1 and policy.in_flight == 1  # the mirror is still blocked
    m.release.set()
    await policy.wait_idle()

    m.release.clear()
    proxy.director = lambda meth, c, p: StreamParameters(Destination(a.target), [slow],
                                                         wait_for_secondaries=True)
    task = asyncio.ensure_future(proxy.echo.Unary(ping()))
    done, _ = await asyncio.wait([task], timeout=0.5)
    assert not done  # held back by the secondary
    m.release.set()
    assert (await task).backend == "a"


async def test_mirror_timing(proxy: Proxy, backends: Backends) -> None:
    """The reference figure, with generous bounds: +400 ms mirror, the client does not wait."""
    a, m = await backends("a"), await backends("mirror")
    policy = MirrorPolicy()
    slow = Destination(m.target, metadata=[("x-sleep-ms", "400")])
    proxy.director = lambda meth, c, p: StreamParameters(Destination(a.target), [slow],
                                                         mirror=policy)
    await proxy.echo.Unary(ping())  # connections up
    await policy.wait_idle()
    started = time.monotonic()
    await proxy.echo.Unary(ping())
    mirrored = time.monotonic() - started
    await policy.wait_idle()
    proxy.director = lambda meth, c, p: StreamParameters(Destination(a.target), [slow],
                                                         wait_for_secondaries=True)
    started = time.monotonic()
    await proxy.echo.Unary(ping())
    waited = time.monotonic() - started
    assert mirrored < 0.3 and waited >= 0.4


@pytest.mark.parametrize("mode", MODES)
async def test_wait_for_secondaries_mode(proxy: Proxy, backends: Backends) -> None:
    a, m = await backends("a"), await backends("mirror")
    proxy.director = lambda meth, c, p: StreamParameters(
        Destination(a.target), [Destination(m.target, metadata=[("x-sleep-ms", "50")])],
        wait_for_secondaries=True)
    assert (await proxy.echo.Unary(ping("w"))).backend == "a"
    assert [r.value for r in m.calls[0].requests] == ["w"] and m.active == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["failing", "unreachable"])
async def test_failing_mirror_does_not_affect_client(proxy: Proxy, backends: Backends,
                                                     kind: str) -> None:
    a, m = await backends("a"), await backends("mirror")
    if kind == "unreachable":
        await m.stop()
    policy = MirrorPolicy()
    errors: list[BaseException] = []

    def handler(exc: BaseException) -> BaseException:
        errors.append(exc)
        return exc

    proxy.director = lambda meth, c, p: StreamParameters(
        Destination(a.target),
        [Destination(m.target, err_handler=handler, metadata=[("x-fail", "UNAVAILABLE:down")])],
        mirror=policy)
    assert (await proxy.echo.Unary(ping())).backend == "a"
    call = proxy.echo.Bidi()
    for i in range(5):
        await call.write(ping(counter=i))
        assert (await call.read()).counter == i
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == Code.OK
    await policy.wait_idle()
    assert len(errors) == 2
    # Also when a write to the mirror races its immediate status (see _callstatus).
    assert [e.code() for e in errors] == [Code.UNAVAILABLE] * 2  # type: ignore[attr-defined]


def mirror_to_a_blocked(proxy: Proxy, a: EchoBackend, m: EchoBackend, policy: MirrorPolicy,
                        **parameters: Any) -> list[BaseException]:
    """Route calls to backend ``a`` and mirror them, by ``policy``, to ``m`` told to block
    (``x-block``); the list returned collects what the mirror's err_handler hears."""
    errors: list[BaseException] = []
    proxy.director = lambda meth, c, p: StreamParameters(
        Destination(a.target),
        [Destination(m.target, err_handler=lambda e: errors.append(e) or e,
                     metadata=[("x-block", "1")])],
        mirror=policy, **parameters)
    return errors


async def test_lagging_mirror_is_cut_off(proxy: Proxy, backends: Backends) -> None:
    """E7: with DROP a mirror that cannot keep up is cut off and reported; BLOCK waits."""
    a, m = await backends("a"), await backends("mirror")
    policy = MirrorPolicy(queue_size=2)
    errors = mirror_to_a_blocked(proxy, a, m, policy, secondary_overflow=Overflow.DROP)
    # The blocked mirror reads nothing; big frames fill the flow-control window and its queue.
    blob = b"x" * (256 * 1024)
    call = proxy.echo.Bidi()
    for i in range(40):
        await call.write(ping(counter=i, blob=blob))
        assert (await call.read()).counter == i
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    await policy.wait_idle()
    [error] = errors
    assert isinstance(error, ProxyError) and error.code == Code.RESOURCE_EXHAUSTED
    assert "fell behind" in error.details


async def test_block_overflow_back_pressures(proxy: Proxy, backends: Backends) -> None:
    """Overflow.BLOCK (Gitaly): a stalled secondary holds the client back and loses nothing."""
    a, m = await backends("a"), await backends("mirror")
    proxy.director = lambda meth, c, p: StreamParameters(
        Destination(a.target), [Destination(m.target, metadata=[("x-block", "1")])],
        wait_for_secondaries=True, secondary_overflow=Overflow.BLOCK,
        mirror=MirrorPolicy(queue_size=2))
    blob = b"x" * (256 * 1024)
    call = proxy.echo.Bidi()

    async def client() -> None:
        for i in range(40):
            await call.write(ping(counter=i, blob=blob))
            assert (await call.read()).counter == i
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF

    task = asyncio.ensure_future(client())
    done, _ = await asyncio.wait([task], timeout=1.0)
    assert not done  # held back by the stalled secondary
    m.release.set()
    await task
    assert [r.counter for r in m.calls[0].requests] == list(range(40))


async def test_mirror_cap_skips_and_reports(proxy: Proxy, backends: Backends) -> None:
    a, m = await backends("a"), await backends("mirror")
    policy = MirrorPolicy(max_in_flight=1)
    errors = mirror_to_a_blocked(proxy, a, m, policy)
    await proxy.echo.Unary(ping())
    await proxy.echo.Unary(ping())
    assert policy.in_flight == 1 and len(m.calls) == 1
    [skipped] = errors
    assert isinstance(skipped, ProxyError) and skipped.code == Code.RESOURCE_EXHAUSTED
    m.release.set()
    await policy.wait_idle()


async def test_mirror_timeout(proxy: Proxy, backends: Backends) -> None:
    a, m = await backends("a"), await backends("mirror")
    policy = MirrorPolicy(timeout=0.2)
    errors = mirror_to_a_blocked(proxy, a, m, policy)
    assert (await proxy.echo.Unary(ping())).backend == "a"
    await policy.wait_idle()
    assert [e.code() for e in errors] == [Code.DEADLINE_EXCEEDED]  # type: ignore[attr-defined]


@pytest.mark.parametrize("stuck", ["timeout", "fell_behind"])
async def test_stuck_streaming_mirror_reports_why(proxy: Proxy, backends: Backends,
                                                  stuck: str) -> None:
    """A mirror that never reads has a write to it in flight when it is cut off: its
    err_handler hears why (the timeout, or falling behind), not grpc.aio's INTERNAL."""
    a, m = await backends("a"), await backends("mirror")
    timeout = 0.5 if stuck == "timeout" else 30
    policy = MirrorPolicy(timeout=timeout, queue_size=1000 if stuck == "timeout" else 2)
    errors = mirror_to_a_blocked(proxy, a, m, policy, secondary_overflow=Overflow.DROP)
    blob = b"x" * (256 * 1024)  # a few of these fill the flow-control window: writes stall
    call = proxy.echo.Bidi()
    started = time.monotonic()
    for i in range(40):
        await call.write(ping(counter=i, blob=blob))
        assert (await call.read()).counter == i
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == Code.OK
    await policy.wait_idle()
    [error] = errors
    if stuck == "timeout":
        assert error.code() == Code.DEADLINE_EXCEEDED, error  # type: ignore[attr-defined]
        assert time.monotonic() - started >= timeout
    else:
        assert isinstance(error, ProxyError) and error.code == Code.RESOURCE_EXHAUSTED, error
        assert "fell behind" in error.details
    m.release.set()


async def test_handle_stream_from_a_local_handler(backends: Backends) -> None:
    """handle_stream proxies from custom code, replaying what the handler peeked."""
    a = await backends()
    pool = ChannelPool()

    async def local(request_iterator: Any, context: Any) -> None:
        peeker = Peeker(context)
        first = pb.Ping.FromString(await peeker.peek())
        backend_md = [("x-peeked", first.value)]
        await handle_stream(context, "/echo.Echo/Bidi",
                            StreamParameters(Destination(a.target, metadata=backend_md)),
                            peeker=peeker, channels=pool)

    proxy = Proxy("stream")
    await proxy.start(lambda server: register_stream_handlers(server, "echo.Echo",
                                                              {"Bidi": local}))
    try:
        call = proxy.echo.Bidi()
        await call.write(ping("p"))
        assert (await call.read()).value == "p"
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert a.calls[-1].metadata["x-peeked"] == "p"
    finally:
        await proxy.stop()
        await pool.aclose()


def test_metadata_filter() -> None:
    from calloutkit.proxy import forwardable

    kept = forwardable([(":authority", "x"), ("User-Agent", "u"), ("X-Team", "a"),
                        ("grpc-timeout", "1S"), ("grpc-trace-bin", b"t"), ("grpc-foo", "no"),
                        ("connection", "close"), ("data-bin", b"\x00")])
    assert kept == (("x-team", "a"), ("grpc-trace-bin", b"t"), ("data-bin", b"\x00"))


def test_public_surface() -> None:
    """Exports change only on purpose, and each is documented."""
    import inspect

    import calloutkit.proxy

    assert set(calloutkit.proxy.__all__) == {
        "WELL_KNOWN_UNARY", "Backend", "BackendConfig", "ChannelPool", "Destination",
        "Director", "HealthCheckConfig", "MirrorPolicy", "MirroringConfig", "Overflow", "Peeker",
        "ProxyError", "ProxyServer", "RouteConfig", "Router", "RoutingConfig",
        "StreamParameters", "Target", "TlsConfig", "TransparentHandler", "TykMatch", "TykView",
        "WireError", "channel_options", "event_view", "fields", "forwardable", "handle_stream",
        "handle_unary", "object_view", "register_service", "register_stream_handlers"}
    for name in calloutkit.proxy.__all__:
        obj = getattr(calloutkit.proxy, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"calloutkit.proxy.{name} has no docstring"
