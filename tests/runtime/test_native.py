"""The native transport (``transport="native"``) against real gRPC clients, with grpc.aio's
transport as the oracle where both can answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from conftest import LOOPBACK, REPO, Certs, running
from envoy.service.auth.v3 import external_auth_pb2 as apb
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2
from test_runtime import grpc_health, headers_request, process_call

from calloutkit import (
    AuthzServer,
    CalloutServer,
    ConfigError,
    NetworkCalloutServer,
    ProcessingResult,
    add_body_mutation,
    add_header_mutation,
    add_trailer_mutation,
    deny_request,
    get_header,
    header_immediate_response,
)
from calloutkit.proxy import ProxyServer
from calloutkit.testing import check_request, data_request, http_headers
from calloutkit.tyk import Hook, Object, Plugin, PluginCall, TykPluginServer
from calloutkit.tyk.testing import HttpRequest, request_object

# Every server here names its transport.
pytestmark = pytest.mark.own_transport


NATIVE = {**LOOPBACK, "transport": "native"}
METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
TRANSPORTS = ["grpcio", "native"]


class Mutator(CalloutServer):
    """A reply in every phase, from inline, pooled and async callbacks alike."""

    def on_request_headers(self, headers, context):
        return add_header_mutation(add=[("x-path", get_header(headers, ":path", ""))])

    async def on_request_body(self, body, context):
        await asyncio.sleep(0)
        return add_body_mutation(body=body.body.upper())

    def on_request_trailers(self, trailers, context):
        return add_trailer_mutation(add=[("x-trailer", "1")])

    async def on_response_headers(self, headers, context):
        return add_header_mutation(add=[("x-resp", "yes")], remove=["server"])

    def on_response_body(self, body, context):
        return add_body_mutation(body=body.body[::-1])


def recorded_stream() -> list[pb.ProcessingRequest]:
    """One HTTP request in every phase, as Envoy sends it."""
    return [
        pb.ProcessingRequest(request_headers=http_headers(
            {":method": "POST", ":path": "/upload", "content-type": "text/plain"})),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=b"hello world")),
        pb.ProcessingRequest(request_trailers=pb.HttpTrailers()),
        pb.ProcessingRequest(response_headers=http_headers({":status": "200", "server": "x"})),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=b"response", end_of_stream=True)),
    ]


async def raw_replies(port: int, requests: list[pb.ProcessingRequest]) -> list[bytes]:
    """The replies' wire bytes, one message at a time as Envoy sends them."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(METHOD)()
        out = []
        for request in requests:
            await call.write(request.SerializeToString())
            out.append(await call.read())
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        return out


async def test_replies_are_byte_identical_on_both_transports() -> None:
    replies = {}
    for transport in TRANSPORTS:
        async with running(Mutator(**LOOPBACK, transport=transport)) as server:
            replies[transport] = await raw_replies(server.plaintext_port, recorded_stream())
    assert len(replies["native"]) == 5
    assert replies["native"] == replies["grpcio"]
    first = pb.ProcessingResponse.FromString(replies["native"][0])
    assert first.request_headers.response.header_mutation.set_headers[0].header.key == "x-path"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_malformed_bytes_end_the_stream_alike_on_both_transports(transport) -> None:
    async with running(Mutator(**LOOPBACK, transport=transport)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
            call = channel.unary_stream(METHOD)(b"\xff\xff\xff garbage")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert (info.value.code(), info.value.details()) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "malformed request: expected envoy.service.ext_proc.v3.ProcessingRequest")
        # and the next stream is served as ever
        assert len(await raw_replies(server.plaintext_port, recorded_stream())) == 5


class Echo(CalloutServer):
    """Echoes request metadata back as initial and trailing metadata."""

    async def on_request_headers(self, headers, context):
        seen = dict(context.invocation_metadata())
        await context.send_initial_metadata((("x-initial", seen["x-team"]),))
        context.set_trailing_metadata((("x-trailing", seen["x-team"]),
                                       ("x-blob-bin", seen["x-blob-bin"] + b"!")))
        remaining = context.time_remaining()
        return add_header_mutation(add=[("x-remaining", f"{remaining:.1f}")])


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_metadata_both_ways_and_the_deadline_reach_the_callback(transport) -> None:
    async with running(Echo(**LOOPBACK, transport=transport)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
            call = process_call(channel)(
                metadata=(("x-team", "blue"), ("x-blob-bin", b"\x00\xff")), timeout=30)
            await call.write(headers_request())
            reply = await call.read()
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
            assert ("x-initial", "blue") in tuple(await call.initial_metadata())
            trailing = tuple(await call.trailing_metadata())
    assert ("x-trailing", "blue") in trailing
    assert ("x-blob-bin", b"\x00\xff!") in trailing
    [option] = reply.request_headers.response.header_mutation.set_headers
    assert 28 < float(option.header.raw_value) <= 31  # gRPC rounds the timeout it sends up


async def test_unknown_method_is_unimplemented_and_health_is_truthful() -> None:
    async with running(Mutator(**NATIVE)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await channel.unary_unary("/no.Such/Method")(b"")
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert await grpc_health(channel) == health_pb2.HealthCheckResponse.SERVING
            assert await grpc_health(channel, "envoy.service.ext_proc.v3.ExternalProcessor") == (
                health_pb2.HealthCheckResponse.SERVING)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await grpc_health(channel, "no.Such")
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
            # Reflection is served only when asked for, as on grpcio.
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await channel.stream_stream(
                    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")().read()
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


def curl(port: int, body: bytes, folder: Any, *headers: str) -> str:
    """POST ``body`` as a gRPC call with curl (over h2c), whose own deadline handling and
    message checks stay out of the way; its verbose output, with the trailers."""
    path = folder / "request.bin"
    path.write_bytes(body)
    extra = [arg for header in headers for arg in ("-H", header)]
    return subprocess.run([
        "curl", "-sv", "--http2-prior-knowledge", "--max-time", "20",
        "-H", "content-type: application/grpc", "-H", "te: trailers", *extra,
        "--data-binary", f"@{path}", f"http://127.0.0.1:{port}{METHOD}"],
        capture_output=True, text=True, timeout=30).stderr


def frame(message: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + len(message).to_bytes(4, "big") + message


async def test_oversize_and_compressed_messages_are_refused(tmp_path) -> None:
    async with running(Mutator(**NATIVE, max_message_size=1024)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
            big = pb.ProcessingRequest(request_body=pb.HttpBody(body=b"x" * 2000))
            call = process_call(channel)()
            await call.write(big)
            assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in await call.details()
            # The connection is fine afterwards.
            call = process_call(channel)()
            await call.write(headers_request())
            assert (await call.read()).HasField("request_headers")
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
        compressed = frame(headers_request().SerializeToString(), flag=1)
        output = await asyncio.to_thread(curl, server.plaintext_port, compressed, tmp_path,
                                         "grpc-encoding: gzip")
    assert "< grpc-status: 12" in output, output


async def test_a_one_mebibyte_body_both_ways() -> None:
    body = bytes(range(256)) * 4096
    async with running(Mutator(**NATIVE)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
            call = process_call(channel)()
            await call.write(pb.ProcessingRequest(response_body=pb.HttpBody(body=body)))
            reply = await call.read()
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
    assert reply.response_body.response.body_mutation.body == body[::-1]


class Sleeper(CalloutServer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cancelled = asyncio.Event()

    async def on_request_headers(self, headers, context):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def until_idle(server: CalloutServer) -> None:
    for _ in range(200):
        if server.active_streams == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{server.active_streams} stream(s) still open")


async def test_a_client_cancelling_mid_stream_ends_the_stream_and_its_callback() -> None:
    async with running(Sleeper(**NATIVE)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
            call = process_call(channel)()
            await call.write(headers_request())
            await asyncio.sleep(0.2)
            assert server.active_streams == 1
            call.cancel()
            await asyncio.wait_for(server.cancelled.wait(), 5)
            await until_idle(server)


async def test_the_server_ends_a_stream_past_its_grpc_timeout(tmp_path) -> None:
    async with running(Sleeper(**NATIVE)) as server:
        output = await asyncio.to_thread(curl, server.plaintext_port,
                                         frame(headers_request().SerializeToString()),
                                         tmp_path, "grpc-timeout: 300m")
        await asyncio.wait_for(server.cancelled.wait(), 5)
        await until_idle(server)
    assert "< grpc-status: 4" in output, output
    assert "< grpc-message: Deadline Exceeded" in output


def tag(call: PluginCall) -> None:
    call.request.set_header("x-native", call.request.headers.get("x-in") or "none")


async def test_a_tyk_dispatch_is_answered_alike_on_both_transports() -> None:
    sent = request_object(Hook.PRE, "tag", HttpRequest(headers=[("x-in", "abc")]),
                          api_id="api-1").SerializeToString()
    replies = {}
    for transport in TRANSPORTS:
        async with running(TykPluginServer(plugins=[Plugin("tag", tag)], **LOOPBACK,
                                           transport=transport)) as server:
            async with grpc.aio.insecure_channel(
                    f"127.0.0.1:{server.plaintext_port}") as channel:
                replies[transport] = await channel.unary_unary(
                    "/coprocess.Dispatcher/Dispatch")(sent, timeout=10)
    assert replies["native"] == replies["grpcio"]
    assert Object.FromString(replies["native"]).request.set_headers["x-native"] == "abc"


class Gate(AuthzServer):
    def on_check(self, request, context):
        if request.path.startswith("/deny"):
            return deny_request(403, body="no")
        return None


async def test_ext_authz_checks_are_answered_alike_on_both_transports() -> None:
    replies: dict[str, list[bytes]] = {}
    for transport in TRANSPORTS:
        async with running(Gate(**LOOPBACK, transport=transport)) as server:
            async with grpc.aio.insecure_channel(
                    f"127.0.0.1:{server.plaintext_port}") as channel:
                check = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")
                replies[transport] = [
                    await check(check_request(path=path).SerializeToString(), timeout=10)
                    for path in ("/ok", "/deny")]
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async with grpc.aio.insecure_channel(
                        f"127.0.0.1:{server.plaintext_port}") as channel:
                    await channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")(
                        b"\xff\xff\xff", timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert replies["native"] == replies["grpcio"]
    assert apb.CheckResponse.FromString(replies["native"][1]).denied_response.body == "no"


async def test_tls_with_a_generated_certificate(certs: Certs) -> None:
    server = Mutator(secure_address=("127.0.0.1", 0), disable_plaintext=True,
                     combined_health_check=True, cert_chain_path=certs.cert_path,
                     private_key_path=certs.key_path, transport="native")
    async with running(server):
        assert server.plaintext_port is None and server.secure_port
        credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca_pem)
        async with grpc.aio.secure_channel(f"localhost:{server.secure_port}",
                                           credentials) as channel:
            call = process_call(channel)()
            await call.write(headers_request("/tls"))
            reply = await call.read()
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
    assert reply.request_headers.response.header_mutation.set_headers[0].header.raw_value == (
        b"/tls")


async def test_calloutkit_send_against_a_native_server() -> None:
    async with running(Mutator(**NATIVE)) as server:
        result = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "calloutkit", "send", "examples/basic/stream.yaml",
            "--address", f"127.0.0.1:{server.plaintext_port}"],
            capture_output=True, text=True, timeout=60, cwd=REPO, start_new_session=True)
    assert result.returncode == 0, result.stderr
    assert '"x-path"' in result.stdout and "HELLO WORLD" in result.stdout


def test_bad_transport_and_unservable_kinds_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="transport must be one of auto, grpcio, native"):
        Mutator(**LOOPBACK, transport="quic")
    with pytest.raises(ConfigError, match="got 'quic'"):
        Mutator(**LOOPBACK, environ={"CALLOUTKIT_TRANSPORT": "quic"})
    assert Mutator(**LOOPBACK, environ={"CALLOUTKIT_TRANSPORT": "Native"}).config.transport == (
        "native")
    # The default is auto, which takes native where calloutkit-native is installed (here).
    default = Mutator(**LOOPBACK, environ={}).config
    assert (default.transport, default.transport_auto) == ("native", True)
    explicit = Mutator(**LOOPBACK, transport="native").config
    assert (explicit.transport, explicit.transport_auto) == ("native", False)


async def test_a_key_rustls_cannot_use_is_a_config_error(certs: Certs, tmp_path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    server = Mutator(secure_address=("127.0.0.1", 0), disable_plaintext=True,
                     combined_health_check=True, cert_chain_path=certs.cert_path,
                     private_key_path=str(key), transport="native")
    with pytest.raises(ConfigError, match=r"^TLS listener 127\.0\.0\.1:0: "):
        await server.start()


def test_options_once_refused_on_native_are_served(certs: Certs, tmp_path) -> None:
    # Once refused on native, now served (tests/runtime/test_mtls.py, test_unix_socket.py,
    # test_idle_streams.py): construction accepts each.
    Mutator(plaintext_address=f"unix:{tmp_path}/s.sock", disable_tls=True,
            combined_health_check=True, transport="native")
    Mutator(secure_address=("127.0.0.1", 0), disable_plaintext=True,
            combined_health_check=True, cert_chain_path=certs.cert_path,
            private_key_path=certs.key_path, client_ca_path=certs.ca_path, transport="native")
    assert Mutator(**NATIVE, stream_idle_timeout=5).config.stream_idle_timeout == 5.0


async def test_a_proxy_cannot_run_on_the_native_transport() -> None:
    async def nowhere(method, context, peeker):
        return None

    server = ProxyServer(director=nowhere, **NATIVE)
    with pytest.raises(ConfigError, match="use transport='grpcio'"):
        await server.start()


async def test_auto_serves_on_native_where_it_is_installed(caplog) -> None:
    caplog.set_level(logging.INFO, logger="calloutkit")
    server = Mutator(**LOOPBACK, transport="auto")
    assert (server.config.transport, server.config.transport_auto) == ("native", True)
    async with running(server):
        assert server._native is not None
        replies = await raw_replies(server.plaintext_port, recorded_stream()[:1])
    assert pb.ProcessingResponse.FromString(replies[0]).HasField("request_headers")
    assert "transport=auto" not in caplog.text


async def test_auto_runs_a_proxy_on_grpcio_and_says_why(caplog) -> None:
    async def nowhere(method, context, peeker):
        return None

    caplog.set_level(logging.INFO, logger="calloutkit")
    server = ProxyServer(director=nowhere, **{**NATIVE, "transport": "auto"})
    async with running(server):
        assert server._native is None and server._grpc is not None
    (line,) = [r.getMessage() for r in caplog.records if "transport=auto" in r.getMessage()]
    assert line == ("transport=auto: serving on grpcio, ProxyServer serves methods the native "
                    "transport cannot (a catch-all handler)")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_stream_waiting_for_its_next_message_is_ended_by_the_drain(transport) -> None:
    server = Mutator(**LOOPBACK, transport=transport)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
        idle = process_call(channel)()
        await idle.write(headers_request())
        await idle.read()
        started = asyncio.get_running_loop().time()
        await server.stop(grace=20)
        assert asyncio.get_running_loop().time() - started < 5  # not the grace period
        assert await idle.code() == grpc.StatusCode.UNAVAILABLE
        assert await idle.details() == "server is draining"


@pytest.mark.parametrize(("transport", "kept"), [("native", True), ("grpcio", False)])
async def test_a_client_pinging_every_second_keeps_an_idle_stream_on_native(transport,
                                                                            kept) -> None:
    # The same client on grpcio shows that it does ping: gRPC core's default policy there
    # (no ping more often than every 5 minutes while no data flows, 2 strikes) ends the
    # connection with GOAWAY too_many_pings. The native transport answers every PING.
    pinging = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 2000),
               ("grpc.http2.max_pings_without_data", 0)]
    async with running(Mutator(**LOOPBACK, transport=transport)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}",
                                             options=pinging) as channel:
            stream = process_call(channel)()
            await stream.write(headers_request())
            assert (await stream.read()).HasField("request_headers")
            await asyncio.sleep(5)  # five keepalive pings, no data
            if kept:
                await stream.write(headers_request())
                assert (await stream.read()).HasField("request_headers")
                await stream.done_writing()
                assert await stream.code() == grpc.StatusCode.OK
            else:
                assert await asyncio.wait_for(stream.code(), 5) == grpc.StatusCode.UNAVAILABLE


# -- recorded streams: the same messages, the same bytes back on either transport ------------

class RecordedL7(Mutator):
    """Mutator, plus an immediate response, an abort and a failure chosen by the path."""

    async def on_request_headers(self, headers, context):
        path = get_header(headers, ":path", "")
        if path == "/deny":
            return header_immediate_response(403, headers=[("x-denied", "1")], body="no\n")
        if path == "/abort":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no entry for /abort")
        if path == "/boom":
            raise RuntimeError("secret internal detail")
        context.set_trailing_metadata((("x-seen", path), ("x-trace-bin", b"\x00\x01")))
        return add_header_mutation(add=[("x-path", path)])


class RecordedL4(NetworkCalloutServer):
    """Upper-cases client bytes, brackets upstream bytes; b"close" closes, b"boom" fails."""

    def on_read_data(self, data, end_of_stream, context):
        if data == b"close":
            context.close_connection()
            return None
        if data == b"boom":
            raise RuntimeError("secret internal detail")
        if data == b"abort":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no entry for this connection")
        return ProcessingResult(processed_data=data.upper(), modified=True)

    async def on_write_data(self, data, end_of_stream, context):
        return (b"[" + data + b"]", True)


def _tyk_reject(call: PluginCall) -> None:
    call.reject(403, "not you", headers=[("x-why", "test")])


def _tyk_fail(call: PluginCall) -> None:
    raise RuntimeError("secret internal detail")


class RecordedAuthz(Gate):
    """Gate, plus an abort and a failure chosen by the path."""

    def on_check(self, request, context):
        if request.path == "/abort":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "who are you")
        if request.path == "/boom":
            raise RuntimeError("secret internal detail")
        return super().on_check(request, context)


def _l7_streams() -> list[list[bytes]]:
    def headers(path: str) -> bytes:
        return pb.ProcessingRequest(request_headers=http_headers(
            {":method": "GET", ":path": path})).SerializeToString()

    return [[m.SerializeToString() for m in recorded_stream()],
            [headers("/deny")], [headers("/abort")], [headers("/boom")],
            [headers("/ok"), b"\xff\xff\xff garbage"]]


def _l4_streams() -> list[list[bytes]]:
    def chunk(direction: str, data: bytes, end: bool = False) -> bytes:
        return data_request(direction, data, end).SerializeToString()

    return [[chunk("read", b"hello"), chunk("write", b"world"), chunk("read", b"bye", True),
             chunk("write", b"", True)],
            [chunk("read", b"one"), chunk("read", b"close")],
            [chunk("read", b"boom")], [chunk("read", b"abort")], [b"\xff\xff\xff garbage"]]


def _tyk_calls() -> list[bytes]:
    def dispatch(name: str, hook: Hook = Hook.PRE) -> bytes:
        return request_object(hook, name, HttpRequest(headers=[("x-in", "abc")]),
                              api_id="api-1").SerializeToString()

    return [dispatch("tag"), dispatch("reject"), dispatch("fail"), dispatch("nobody"),
            b"\xff\xff\xff garbage"]


def _authz_calls() -> list[bytes]:
    return [check_request(path=path).SerializeToString()
            for path in ("/ok", "/deny", "/abort", "/boom")] + [b"\xff\xff\xff garbage"]


# (server factory, method, recorded streams (bidi) or calls (unary)) per protocol
RECORDED: dict[str, tuple[Callable[..., Any], str, bool, Callable[[], list[Any]]]] = {
    "l7": (RecordedL7, METHOD, True, _l7_streams),
    "l4": (RecordedL4, "/envoy.service.network_ext_proc.v3.NetworkExternalProcessor/Process",
           True, _l4_streams),
    "tyk": (lambda **kw: TykPluginServer(plugins=[Plugin("tag", tag), Plugin("reject", _tyk_reject),
                                                  Plugin("fail", _tyk_fail)], **kw),
            "/coprocess.Dispatcher/Dispatch", False, _tyk_calls),
    "authz": (RecordedAuthz, "/envoy.service.auth.v3.Authorization/Check", False, _authz_calls),
}


async def _outcome(call: Any) -> tuple[Any, ...]:
    return (await call.code(), await call.details(),
            tuple(await call.trailing_metadata() or ()))


async def replay(port: int, method: str, bidi: bool, recorded: list[Any]) -> list[Any]:
    """Each recorded stream (or unary call) sent as Envoy or the gateway would: the replies'
    bytes, then the final status, details and trailing metadata."""
    out: list[Any] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        for messages in recorded:
            if not bidi:
                call = channel.unary_unary(method)(messages, metadata=(("x-team", "blue"),),
                                                   timeout=10)
                with contextlib.suppress(grpc.aio.AioRpcError):
                    out.append(await call)
                out.append(await _outcome(call))
                continue
            call = channel.stream_stream(method)(metadata=(("x-team", "blue"),), timeout=10)
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                for message in messages:
                    await call.write(message)
                    reply = await call.read()
                    if reply is grpc.aio.EOF:
                        break
                    out.append(reply)
                await call.done_writing()
            out.append(await _outcome(call))
    return out


@pytest.mark.parametrize("protocol", sorted(RECORDED))
async def test_recorded_streams_get_byte_identical_replies_on_both_transports(
        protocol: str) -> None:
    factory, method, bidi, recorded = RECORDED[protocol]
    seen = {}
    for transport in TRANSPORTS:
        async with running(factory(**LOOPBACK, transport=transport)) as server:
            seen[transport] = await replay(server.plaintext_port, method, bidi, recorded())
    assert seen["native"] == seen["grpcio"]
    statuses = [item[0] for item in seen["native"] if isinstance(item, tuple)]
    assert len(statuses) == 5
    assert grpc.StatusCode.OK in statuses and len(set(statuses)) >= 2  # errors were recorded
    assert all("secret" not in str(item) for item in seen["native"])
