"""The small service behind the calloutkit.proxy tests, and backends that serve it.

`protos()` compiles ``proxytest_echo.proto`` with grpc_tools into a temporary folder (once per
process) and imports it, so the generated code can never drift from the .proto.

`EchoBackend` serves ``echo.Echo``, ``echo.Admin`` and a raw-bytes echo (``/raw.Raw/Echo``) on a
kernel-chosen loopback port. The client steers it with metadata, which the proxy forwards:

- ``x-fail: CODE:details`` fail with that status (after ``x-fail-after`` messages, default 0)
- ``x-header: k=v,...`` send these response headers first; keys ``test-*`` are echoed back too
- ``x-trailer: k=v,...`` set these trailers
- ``x-sleep-ms: N`` sleep before answering; ``x-block: 1`` wait for `EchoBackend.release`

``/raw.Raw/Quit`` ends the call at once without reading the request: OK, or the ``x-fail``
status, with the ``x-trailer`` trailers.

It records every call (`Seen`: method, metadata, deadline left, requests) and every cancel.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
import os
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import grpc
import pytest

from calloutkit.proxy import RoutingConfig

HERE = os.path.dirname(os.path.abspath(__file__))
BIG = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1),
       ("grpc.so_reuseport", 0)]


@functools.cache
def protos() -> tuple[ModuleType, ModuleType]:
    """(proxytest_echo_pb2, proxytest_echo_pb2_grpc), compiled from the .proto for this run."""
    from grpc_tools import protoc

    # The folder goes as soon as the modules are imported: backends run in processes that
    # tests SIGKILL, where no atexit handler would remove it.
    with tempfile.TemporaryDirectory(prefix="calloutkit-proxytest-") as out:
        code = protoc.main(["protoc", f"-I{HERE}", f"--python_out={out}",
                            f"--grpc_python_out={out}", os.path.join(HERE, "proxytest_echo.proto")])
        if code != 0:
            raise RuntimeError(f"protoc failed with {code}")
        sys.path.insert(0, out)
        try:
            return (importlib.import_module("proxytest_echo_pb2"),
                    importlib.import_module("proxytest_echo_pb2_grpc"))
        finally:
            sys.path.remove(out)


async def assert_no_tasks_left(timeout: float = 2.0) -> None:
    """Fail if any asyncio task other than the caller is still running after ``timeout``."""
    current = asyncio.current_task()
    left: list[asyncio.Task[Any]] = []
    for _ in range(int(timeout / 0.01)):
        left = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        if not left:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"tasks left behind: {left}")


@pytest.fixture(autouse=True)
async def no_leftovers() -> AsyncIterator[None]:
    """After each test of a module that imports this fixture, no task of the proxy (or
    anyone) is still running."""
    yield
    await assert_no_tasks_left()


#: A proxy or backend server on a free loopback port, plaintext, health on the gRPC port.
SERVER = {"plaintext_address": ("127.0.0.1", 0), "disable_tls": True,
          "combined_health_check": True, "grace_period": 5}


def parse_routes(text: str) -> RoutingConfig:
    """A routing file's text (indented as in a test) parsed as ``routes.yaml``."""
    return RoutingConfig.parse(textwrap.dedent(text), "routes.yaml")



@dataclasses.dataclass
class Seen:
    """One call as the backend saw it."""

    method: str
    metadata: dict[str, Any]
    time_remaining: float | None
    requests: list[Any] = dataclasses.field(default_factory=list)


def _pairs(text: str) -> list[tuple[str, str]]:
    return [tuple(p.strip().split("=", 1)) for p in text.split(",") if "=" in p]  # type: ignore[misc]


class _Recording(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Notes each accepted call before its handler runs."""

    def __init__(self, received: list[str], handlers: tuple[Any, ...]) -> None:
        self._received = received
        self._handlers = handlers

    def service(self, details: Any) -> Any:
        self._received.append(details.method)
        for handler in self._handlers:
            found = handler.service(details)
            if found is not None:
                return found
        return None


class EchoBackend:
    """An in-process backend for the test service (see the module docstring)."""

    def __init__(self, name: str = "a", *, health: bool = False) -> None:
        self.name = name
        self.health: Any = None  # a grpc health servicer when ``health`` is asked for
        self._with_health = health
        self.calls: list[Seen] = []
        self.received: list[str] = []  # every call the server accepted, even if cancelled early
        self.cancelled: list[str] = []
        self.active = 0
        self.port = 0
        self.release = asyncio.Event()
        self._server: grpc.aio.Server | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def methods(self) -> list[str]:
        return [seen.method for seen in self.calls]

    async def start(self, port: int = 0) -> EchoBackend:
        pb, _ = protos()
        server = grpc.aio.server(options=BIG)
        unary = functools.partial(grpc.unary_unary_rpc_method_handler,
                                  request_deserializer=pb.Ping.FromString,
                                  response_serializer=pb.Pong.SerializeToString)
        server.add_generic_rpc_handlers((_Recording(self.received, (
            grpc.method_handlers_generic_handler("echo.Echo", {
                "Unary": unary(self._unary),
                "ServerStream": grpc.unary_stream_rpc_method_handler(
                    self._server_stream, pb.Ping.FromString, pb.Pong.SerializeToString),
                "ClientStream": grpc.stream_unary_rpc_method_handler(
                    self._client_stream, pb.Ping.FromString, pb.Pong.SerializeToString),
                "Bidi": grpc.stream_stream_rpc_method_handler(
                    self._bidi, pb.Ping.FromString, pb.Pong.SerializeToString),
            }),
            grpc.method_handlers_generic_handler("echo.Admin", {"Stats": unary(self._stats)}),
            grpc.method_handlers_generic_handler("raw.Raw", {
                "Echo": grpc.stream_stream_rpc_method_handler(self._raw),
                "Quit": grpc.stream_stream_rpc_method_handler(self._quit)}),
        )),))
        if self._with_health:
            from grpc_health.v1 import health, health_pb2_grpc

            self.health = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{port}")
        if not self.port:
            raise RuntimeError(f"cannot bind 127.0.0.1:{port}")
        await server.start()
        self._server = server
        if self.health is not None:
            await self.set_serving(True)
        return self

    async def set_serving(self, serving: bool) -> None:
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse
        await self.health.set("", status.SERVING if serving else status.NOT_SERVING)

    async def stop(self, grace: float | None = 0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    # -- behaviour ------------------------------------------------------------------------

    async def _begin(self, method: str, context: Any) -> Seen:
        self.active += 1
        md = dict(context.invocation_metadata())
        seen = Seen(method, md, context.time_remaining())
        self.calls.append(seen)
        headers = _pairs(md.get("x-header", ""))
        headers += [(k, v) for k, v in md.items() if k.startswith("test-")]
        if headers:
            await context.send_initial_metadata(headers)
        if "x-trailer" in md:
            context.set_trailing_metadata(_pairs(md["x-trailer"]))
        if "x-sleep-ms" in md:
            await asyncio.sleep(int(md["x-sleep-ms"]) / 1000)
        if "x-block" in md:
            await self.release.wait()
        return seen

    async def _maybe_fail(self, seen: Seen, context: Any, sent: int) -> None:
        spec = seen.metadata.get("x-fail")
        if spec and sent >= int(seen.metadata.get("x-fail-after", "0")):
            code, _, details = spec.partition(":")
            await context.abort(getattr(grpc.StatusCode, code), details)

    def _pong(self, ping: Any, **extra: Any) -> Any:
        pb, _ = protos()
        return pb.Pong(value=ping.value, counter=ping.counter, backend=self.name, blob=ping.blob,
                       **extra)

    async def _guard(self, method: str, body: Any) -> Any:
        try:
            return await body
        except asyncio.CancelledError:
            self.cancelled.append(method)
            raise
        finally:
            self.active -= 1

    async def _unary(self, request: Any, context: Any) -> Any:
        async def body() -> Any:
            seen = await self._begin("/echo.Echo/Unary", context)
            seen.requests.append(request)
            await self._maybe_fail(seen, context, 0)
            return self._pong(request)
        return await self._guard("/echo.Echo/Unary", body())

    async def _stats(self, request: Any, context: Any) -> Any:
        async def body() -> Any:
            seen = await self._begin("/echo.Admin/Stats", context)
            seen.requests.append(request)
            await self._maybe_fail(seen, context, 0)
            return self._pong(request, count=len(self.calls))
        return await self._guard("/echo.Admin/Stats", body())

    async def _server_stream(self, request: Any, context: Any) -> None:
        async def body() -> None:
            seen = await self._begin("/echo.Echo/ServerStream", context)
            seen.requests.append(request)
            for i in range(max(request.counter, 0)):
                await self._maybe_fail(seen, context, i)
                await context.write(self._pong(request, count=i))
                if "x-block" in seen.metadata:
                    await asyncio.sleep(0.01)
            await self._maybe_fail(seen, context, request.counter)
        await self._guard("/echo.Echo/ServerStream", body())

    async def _client_stream(self, request_iterator: Any, context: Any) -> Any:
        async def body() -> Any:
            pb, _ = protos()
            seen = await self._begin("/echo.Echo/ClientStream", context)
            async for request in request_iterator:
                seen.requests.append(request)
            await self._maybe_fail(seen, context, len(seen.requests))
            return pb.Pong(backend=self.name, count=len(seen.requests))
        return await self._guard("/echo.Echo/ClientStream", body())

    async def _bidi(self, request_iterator: Any, context: Any) -> None:
        async def body() -> None:
            seen = await self._begin("/echo.Echo/Bidi", context)
            await self._maybe_fail(seen, context, 0)
            async for request in request_iterator:
                seen.requests.append(request)
                await context.write(self._pong(request, count=len(seen.requests)))
                await self._maybe_fail(seen, context, len(seen.requests))
        await self._guard("/echo.Echo/Bidi", body())

    async def _raw(self, request_iterator: Any, context: Any) -> None:
        async def body() -> None:
            seen = await self._begin("/raw.Raw/Echo", context)
            async for frame in request_iterator:
                seen.requests.append(frame)
                await context.write(frame)
        await self._guard("/raw.Raw/Echo", body())

    async def _quit(self, request_iterator: Any, context: Any) -> None:
        async def body() -> None:
            seen = await self._begin("/raw.Raw/Quit", context)
            await self._maybe_fail(seen, context, 0)
        await self._guard("/raw.Raw/Quit", body())


EARLY_END_CASES = (
    ((), ("OK", "", ())),
    ((("x-fail", "FAILED_PRECONDITION:ended early"), ("x-trailer", "why=early")),
     ("FAILED_PRECONDITION", "ended early", (("why", "early"),))),
)


def early_end_outcomes(target: str, calls: int = 150, messages: int = 50) -> list[Any]:
    """Stream ``messages`` requests on ``calls`` calls of ``/raw.Raw/Quit`` through ``target``,
    for each case of `EARLY_END_CASES`; what each call ended with, next to what was expected.

    The client is grpcio's synchronous one on purpose: grpc.aio's own client garbles a status
    that arrives while one of its writes is in flight, which would blame the proxy for it.
    """
    import collections
    from concurrent.futures import ThreadPoolExecutor

    request = b"x" * 1000

    def one(metadata: tuple[tuple[str, str], ...]) -> tuple[str, str, tuple[Any, ...]]:
        call = quit_call(iter([request] * messages), metadata=metadata, timeout=30)
        try:
            for _ in call:
                pass
        except grpc.RpcError:
            pass
        trailers = tuple((m.key, m.value) for m in call.trailing_metadata() or ())
        return call.code().name, call.details() or "", trailers

    outcomes = []
    with grpc.insecure_channel(target) as channel, ThreadPoolExecutor(16) as pool:
        quit_call = channel.stream_stream("/raw.Raw/Quit", None, None)
        for metadata, expected in EARLY_END_CASES:
            got = collections.Counter(pool.map(one, [metadata] * calls))
            outcomes.append((expected, dict(got)))
    return outcomes
