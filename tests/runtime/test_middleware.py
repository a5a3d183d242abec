"""Middleware around every callback, through each protocol: order, short-circuit, errors."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingResponse

from calloutkit import (
    AuthzServer,
    CallInfo,
    CalloutServer,
    ConfigError,
    NetworkCalloutServer,
    ProcessingResult,
    deny_request,
    header_immediate_response,
    nonblocking,
)
from calloutkit.testing import AuthzClient, CalloutClient, NetworkCalloutClient
from calloutkit.tyk import Hook, Object, Plugin, PluginCall, TykPluginServer
from calloutkit.tyk.testing import HttpRequest, request_object

LOCAL: dict[str, Any] = {"plaintext_address": ("127.0.0.1", 0), "disable_tls": True,
                         "combined_health_check": True}


def recorder(log: list[str]) -> tuple[Any, Any]:
    """An async and a def middleware that log around the call, with where they ran."""

    async def outer(call: CallInfo, proceed: Any) -> Any:
        log.append(f"async in {call.phase}")
        result = await proceed()
        log.append("async out")
        return result

    def inner(call: CallInfo, proceed: Any) -> Any:
        main = threading.current_thread() is threading.main_thread()
        log.append(f"def in {call.phase} main={main}")
        result = proceed()
        log.append("def out")
        return result

    return outer, inner


class Headers(CalloutServer):
    async def on_request_headers(self, headers: Any, context: Any) -> Any:
        context.state.log.append("callback")
        return None

    def new_state(self) -> Any:
        return type("State", (), {"log": []})()


# -- L7 ------------------------------------------------------------------------------------

async def test_l7_first_middleware_is_outermost_and_def_ones_run_in_a_thread() -> None:
    log: list[str] = []
    outer, inner = recorder(log)
    seen: list[CallInfo] = []

    async def spy(call: CallInfo, proceed: Any) -> Any:
        seen.append(call)
        return await proceed()

    class Server(CalloutServer):
        def on_request_headers(self, headers: Any, context: Any) -> Any:
            log.append("callback")
            return None

    client = CalloutClient(Server(**LOCAL, middleware=[outer, inner, spy]))
    async with client.stream() as stream:
        reply = await stream.request_headers({":path": "/a"})
    assert reply is not None and reply.HasField("request_headers")
    assert log == ["async in request_headers", "def in request_headers main=False", "callback",
                   "def out", "async out"]
    (call,) = seen
    assert (call.protocol, call.phase, call.callback) == ("ext_proc", "request_headers",
                                                          "on_request_headers")
    assert call.message.headers.headers[0].key == ":path"
    assert call.context.request_headers is call.message


async def test_l7_a_middleware_answers_in_the_callbacks_place() -> None:
    called: list[str] = []

    async def gate(call: CallInfo, proceed: Any) -> Any:
        if call.phase == "request_headers":
            return ProcessingResponse(immediate_response=header_immediate_response(401))
        return await proceed()

    class Server(CalloutServer):
        @nonblocking
        def on_request_headers(self, headers: Any, context: Any) -> Any:
            called.append("headers")

    client = CalloutClient(Server(**LOCAL, middleware=[gate]))
    async with client.stream() as stream:
        reply = await stream.request_headers({":path": "/"})
    assert reply is not None and reply.immediate_response.status.code == 401
    assert called == []


@pytest.mark.parametrize("kind", ["def", "async"])
async def test_l7_a_raising_middleware_gets_the_error_policy(kind: str) -> None:
    def boom(call: CallInfo, proceed: Any) -> Any:
        raise RuntimeError("secret detail")

    async def aboom(call: CallInfo, proceed: Any) -> Any:
        raise RuntimeError("secret detail")

    server = Headers(**LOCAL, middleware=[boom if kind == "def" else aboom])
    async with CalloutClient(server).stream() as stream:
        reply = await stream.request_headers({":path": "/"})
    assert reply is not None and reply.immediate_response.status.code == 500
    assert b"secret" not in reply.SerializeToString()
    continuing = Headers(**LOCAL, middleware=[boom], error_policy="continue")
    async with CalloutClient(continuing).stream() as stream:
        reply = await stream.request_headers({":path": "/"})
    assert reply is not None and reply.HasField("request_headers")


async def test_l7_a_callbacks_exception_passes_through_middleware() -> None:
    seen: list[str] = []

    async def watch(call: CallInfo, proceed: Any) -> Any:
        try:
            return await proceed()
        except ValueError as exc:
            seen.append(str(exc))
            raise

    class Server(CalloutServer):
        def on_request_headers(self, headers: Any, context: Any) -> Any:
            raise ValueError("bad")

    async with CalloutClient(Server(**LOCAL, middleware=[watch])).stream() as stream:
        reply = await stream.request_headers({":path": "/"})
    assert seen == ["bad"]
    assert reply is not None and reply.immediate_response.status.code == 500


async def test_without_middleware_the_callback_is_called_as_before() -> None:
    # The zero-cost promise: no wrapper at all, the hot path calls the method itself.
    server = Headers(**LOCAL)
    assert server._callbacks["request_headers"].func == server.on_request_headers
    wrapped = Headers(**LOCAL, middleware=[recorder([])[0]])
    assert wrapped._callbacks["request_headers"].func != wrapped.on_request_headers


def test_middleware_must_be_a_list_of_callables() -> None:
    with pytest.raises(ConfigError, match="middleware: 3 is not callable"):
        Headers(**LOCAL, middleware=[3])
    with pytest.raises(ConfigError, match="middleware must be a list"):
        Headers(**LOCAL, middleware=lambda call, proceed: proceed())


# -- L4 ------------------------------------------------------------------------------------

async def test_l4_order_short_circuit_and_error_policy() -> None:
    log: list[str] = []
    outer, inner = recorder(log)

    async def upper(call: CallInfo, proceed: Any) -> Any:
        if call.message == b"skip":
            return ProcessingResult(b"SKIPPED", modified=True)
        if call.message == b"boom":
            raise RuntimeError("boom")
        return await proceed()

    class Server(NetworkCalloutServer):
        async def on_read_data(self, data: bytes, end_of_stream: bool, context: Any) -> Any:
            log.append("callback")
            return ProcessingResult(data + b"!", modified=True)

    client = NetworkCalloutClient(Server(**LOCAL, middleware=[outer, inner, upper]))
    async with client.stream() as connection:
        reply = await connection.read(b"hi")
        assert reply.read_data.data == b"hi!"
        assert log == ["async in read_data", "def in read_data main=False", "callback",
                       "def out", "async out"]
        reply = await connection.read(b"skip")
        assert reply.read_data.data == b"SKIPPED"
        assert log.count("callback") == 1
        reply = await connection.read(b"boom")  # fail_closed: the connection is closed
        assert reply.connection_status == reply.CLOSE


# -- ext_authz -----------------------------------------------------------------------------

async def test_authz_order_short_circuit_and_error_policy() -> None:
    log: list[str] = []
    outer, inner = recorder(log)

    def gate(call: CallInfo, proceed: Any) -> Any:
        assert call.protocol == "ext_authz" and call.callback == "on_check"
        if call.message.path == "/blocked":
            return deny_request(451, "blocked")
        if call.message.path == "/boom":
            raise RuntimeError("boom")
        return proceed()

    class Server(AuthzServer):
        async def on_check(self, request: Any, context: Any) -> Any:
            log.append("callback")
            return None

    client = AuthzClient(Server(**LOCAL, middleware=[outer, inner, gate], error_status=503))
    reply = await client.check("GET", "/ok")
    assert reply.status.code == 0
    assert log == ["async in check", "def in check main=False", "callback", "def out",
                   "async out"]
    assert (await client.check("GET", "/blocked")).denied_response.status.code == 451
    assert (await client.check("GET", "/boom")).denied_response.status.code == 503
    assert log.count("callback") == 1


# -- Tyk -----------------------------------------------------------------------------------

async def test_tyk_order_short_circuit_and_error_policy() -> None:
    log: list[str] = []
    outer, inner = recorder(log)
    calls: list[CallInfo] = []

    async def gate(call: CallInfo, proceed: Any) -> Any:
        calls.append(call)
        path = call.message.request.url
        if path == "/blocked":
            call.context.reject(403, "blocked")
            return None
        if path == "/boom":
            raise RuntimeError("boom")
        return await proceed()

    def check(call: PluginCall) -> None:
        log.append("callback")
        call.request.set_header("x-seen", "1")

    server = TykPluginServer(**LOCAL, plugins=[Plugin("Check", check, hook="pre")],
                             middleware=[outer, inner, gate])

    async def send(path: str) -> Object:
        sent = request_object("pre", "Check", HttpRequest("GET", path))
        return Object.FromString(await server.dispatch_bytes(sent.SerializeToString()))

    answer = await send("/ok")
    assert answer.request.set_headers["x-seen"] == "1"
    assert log == ["async in pre", "def in pre main=False", "callback", "def out", "async out"]
    assert (calls[0].protocol, calls[0].phase, calls[0].callback) == ("tyk", "pre", "Check")
    assert isinstance(calls[0].context, PluginCall) and calls[0].context.hook is Hook.PRE
    assert (await send("/blocked")).request.return_overrides.response_code == 403
    assert (await send("/boom")).request.return_overrides.response_code == 500
    assert log.count("callback") == 1
