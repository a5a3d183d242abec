"""``def`` callbacks on the native transport: answered off the event loop (the transport thread
starts the answer, a pool thread runs the callback and finishes it), with everything the loop
path gives them: callback_timeout, the error policy, StreamAbort, awaitables, cancellation."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import grpc
import pytest
from conftest import LOOPBACK, running
from envoy.service.auth.v3 import external_auth_pb2 as apb
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.network_ext_proc.v3 import network_external_processor_pb2 as npb
from test_runtime import headers_request, process_call

from calloutkit import (
    AuthzServer,
    CalloutServer,
    NetworkCalloutServer,
    ProcessingResult,
    add_header_mutation,
    deny_request,
    get_header,
)
from calloutkit.testing import check_request, http_headers
from calloutkit.tyk import Hook, Object, Plugin, PluginCall, TykPluginServer
from calloutkit.tyk.testing import HttpRequest, request_object

TRANSPORTS = ["grpcio", "native"]
L4_METHOD = "/envoy.service.network_ext_proc.v3.NetworkExternalProcessor/Process"


class Pooled(CalloutServer):
    """Plain def callbacks (the pool): each reads the path and says which thread it ran in."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.release = threading.Event()
        self.started = threading.Event()
        self.finished = threading.Event()

    def on_request_headers(self, headers, context):
        path = get_header(headers, ":path", "")
        if path == "/raise":
            raise ValueError("boom")
        if path == "/abort":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "not you")
        if path == "/coroutine":
            return self.later(path)
        if path == "/block":
            self.started.set()
            self.release.wait()
            self.finished.set()
        return add_header_mutation(add=[("x-path", path),
                                        ("x-thread", threading.current_thread().name)])

    def on_response_headers(self, headers, context):
        return add_header_mutation(add=[("x-status", get_header(headers, ":status", ""))])

    async def later(self, path: str) -> Any:
        await asyncio.sleep(0.01)  # needs the event loop
        return add_header_mutation(add=[("x-path", path), ("x-later", "1")])


def response_headers() -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_headers=http_headers({":status": "201"}))


def added(reply: pb.ProcessingResponse, phase: str = "request_headers") -> dict[str, str]:
    mutation = getattr(reply, phase).response.header_mutation
    return {o.header.key: o.header.raw_value.decode() for o in mutation.set_headers}


async def exchange(port: int, requests: list[pb.ProcessingRequest],
                   ) -> tuple[list[pb.ProcessingResponse], grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = process_call(channel)()
        replies = []
        for request in requests:
            try:
                await call.write(request)
                reply = await call.read()
            except grpc.aio.AioRpcError:  # the stream ended with a status: code() says which
                break
            if reply is grpc.aio.EOF:
                break
            replies.append(reply)
        else:
            await call.done_writing()
        return replies, await call.code(), await call.details()


class LoopWakeups:
    """Counts what other threads hand to the server's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.count = 0
        self._loop = loop
        self._original = loop.call_soon_threadsafe

        def counted(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not threading.main_thread():
                self.count += 1
            return self._original(*args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]

    def close(self) -> None:
        del self._loop.call_soon_threadsafe


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_def_callbacks_answer_alike_and_only_the_native_ones_skip_the_loop(
        transport: str) -> None:
    # No watchdog (callback_timeout 0): its timer is the one thing the pool may still arm
    # on the loop.
    server = Pooled(**LOOPBACK, transport=transport, callback_timeout=0)
    async with running(server):
        wakeups = LoopWakeups(asyncio.get_running_loop())
        try:
            for n in range(20):
                replies, code, _ = await exchange(server.plaintext_port, [
                    headers_request(f"/n/{n}"), response_headers()])
                assert code == grpc.StatusCode.OK
                assert added(replies[0])["x-path"] == f"/n/{n}"
                assert added(replies[0])["x-thread"].startswith("calloutkit-callback")
                assert added(replies[1], "response_headers") == {"x-status": "201"}
        finally:
            wakeups.close()
    if transport == "native":
        assert wakeups.count == 0  # 40 answers, and not one of them went through the loop
    else:
        assert wakeups.count >= 40  # each result comes back to the loop from its thread


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_stuck_def_callback_gets_the_policy_reply_and_its_thread_is_replaced(
        transport: str) -> None:
    server = Pooled(**LOOPBACK, transport=transport, callback_timeout=0.2,
                    server_thread_count=1)
    async with running(server):
        try:
            replies, code, _ = await asyncio.wait_for(
                exchange(server.plaintext_port, [headers_request("/block")]), 5)
            assert code == grpc.StatusCode.OK
            assert replies[0].immediate_response.status.code == 500
            assert server._pool.stuck == 1
            # The one thread is stuck; another took its place and answers the next stream.
            replies, code, _ = await asyncio.wait_for(
                exchange(server.plaintext_port, [headers_request("/after")]), 5)
            assert added(replies[0])["x-path"] == "/after"
        finally:
            server.release.set()
        await asyncio.to_thread(server.finished.wait, 5)
        for _ in range(100):  # its late result is dropped on the loop
            if server._pool.stuck == 0:
                break
            await asyncio.sleep(0.02)
        assert server._pool.stuck == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("policy", "expected"), [("fail_closed", 500), ("continue", None)])
async def test_a_def_callback_that_raises_gets_the_error_policy(
        transport: str, policy: str, expected: int | None,
        caplog: pytest.LogCaptureFixture) -> None:
    async with running(Pooled(**LOOPBACK, transport=transport, error_policy=policy)) as server:
        replies, code, _ = await exchange(server.plaintext_port, [headers_request("/raise"),
                                                                  response_headers()])
    assert code == grpc.StatusCode.OK
    if expected is None:
        assert replies[0].HasField("request_headers") and added(replies[0]) == {}
        assert added(replies[1], "response_headers") == {"x-status": "201"}
    else:
        assert replies[0].immediate_response.status.code == expected
    assert "on_request_headers failed" in caplog.text
    assert "ValueError: boom" in caplog.text


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_def_callback_returning_a_coroutine_is_awaited_on_the_loop(
        transport: str) -> None:
    async with running(Pooled(**LOOPBACK, transport=transport)) as server:
        replies, code, _ = await exchange(server.plaintext_port, [
            headers_request("/coroutine"), response_headers()])
    assert code == grpc.StatusCode.OK
    assert added(replies[0]) == {"x-path": "/coroutine", "x-later": "1"}
    assert added(replies[1], "response_headers") == {"x-status": "201"}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_stream_abort_in_a_def_callback_ends_the_stream_with_its_status(
        transport: str) -> None:
    async with running(Pooled(**LOOPBACK, transport=transport)) as server:
        replies, code, details = await exchange(server.plaintext_port,
                                                [headers_request("/abort")])
    assert replies == []
    assert (code, details) == (grpc.StatusCode.PERMISSION_DENIED, "not you")


async def test_a_client_cancelling_mid_def_callback_leaves_the_server_serving(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="calloutkit")
    server = Pooled(**LOOPBACK, transport="native")
    async with running(server):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
            call = process_call(channel)()
            await call.write(headers_request("/block"))
            await asyncio.to_thread(server.started.wait, 5)
            call.cancel()
        for _ in range(100):
            if server.active_streams == 0:
                break
            await asyncio.sleep(0.02)
        assert server.active_streams == 0
        server.release.set()  # the callback returns to a stream that is gone
        await asyncio.to_thread(server.finished.wait, 5)
        replies, code, _ = await exchange(server.plaintext_port, [headers_request("/next")])
        assert code == grpc.StatusCode.OK and added(replies[0])["x-path"] == "/next"
    assert caplog.records == []


# -- the other protocols the native transport serves -----------------------------------------

class Upper(NetworkCalloutServer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.release = threading.Event()

    def on_read_data(self, data, end_of_stream, context):
        if data == b"block":
            self.release.wait()
        if data == b"later":
            return self.later(data)
        return ProcessingResult(data.upper(), modified=True)

    def should_close_connection(self, data, modified, context):
        return data == b"bye"

    async def later(self, data: bytes) -> ProcessingResult:
        await asyncio.sleep(0)
        return ProcessingResult(data + b"!", modified=True)


async def l4_replies(port: int, chunks: list[bytes]) -> list[npb.ProcessingResponse]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(
            L4_METHOD, request_serializer=npb.ProcessingRequest.SerializeToString,
            response_deserializer=npb.ProcessingResponse.FromString)()
        out = []
        for chunk in chunks:
            await call.write(npb.ProcessingRequest(read_data=npb.Data(data=chunk)))
            out.append(await call.read())
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        return out


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_l4_def_callbacks_answer_alike(transport: str) -> None:
    server = Upper(**LOOPBACK, transport=transport, callback_timeout=0.2)
    async with running(server):
        try:
            replies = await asyncio.wait_for(l4_replies(
                server.plaintext_port, [b"abc", b"later", b"bye", b"block"]), 5)
        finally:
            server.release.set()
    assert [r.read_data.data for r in replies[:3]] == [b"ABC", b"later!", b"BYE"]
    assert [r.connection_status for r in replies] == [
        npb.ProcessingResponse.CONTINUE, npb.ProcessingResponse.CONTINUE,
        npb.ProcessingResponse.CLOSE, npb.ProcessingResponse.CLOSE]  # bye; the stuck one


class Gate(AuthzServer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.release = threading.Event()

    def on_check(self, request, context):
        if request.path == "/block":
            self.release.wait()
        if request.path == "/deny":
            return deny_request(403, body=threading.current_thread().name)
        if request.path == "/abort":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "who")
        return None


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_authz_def_checks_answer_alike(transport: str) -> None:
    server = Gate(**LOOPBACK, transport=transport, callback_timeout=0.2)
    async with running(server):
        try:
            async with grpc.aio.insecure_channel(
                    f"127.0.0.1:{server.plaintext_port}") as channel:
                check = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")

                async def checked(path: str) -> apb.CheckResponse:
                    return apb.CheckResponse.FromString(
                        await check(check_request(path=path).SerializeToString(), timeout=5))

                assert (await checked("/ok")).HasField("ok_response")
                denied = (await checked("/deny")).denied_response
                assert denied.status.code == 403
                assert denied.body.startswith("calloutkit-callback")
                # Stuck past callback_timeout: the policy (fail closed) denies.
                assert (await checked("/block")).HasField("denied_response")
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await checked("/abort")
                assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            server.release.set()


def tag(call: PluginCall) -> None:
    if call.request.headers.get("x-in") == "raise":
        raise ValueError("plugin failed")
    call.request.set_header("x-thread", threading.current_thread().name)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_tyk_def_plugins_answer_alike(transport: str) -> None:
    server = TykPluginServer(plugins=[Plugin("tag", tag)], **LOOPBACK, transport=transport)
    async with running(server):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
            dispatch = channel.unary_unary("/coprocess.Dispatcher/Dispatch")

            async def dispatched(value: str) -> Object:
                sent = request_object(Hook.PRE, "tag", HttpRequest(headers=[("x-in", value)]))
                return Object.FromString(await dispatch(sent.SerializeToString(), timeout=5))

            ok = await dispatched("fine")
            assert ok.request.set_headers["x-thread"].startswith("calloutkit-callback")
            failed = await dispatched("raise")
            assert failed.request.return_overrides.response_code == 500

