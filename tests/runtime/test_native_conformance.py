"""gRPC conformance of each transport against grpcio clients: unary and bidi calls, cancel,
deadlines, metadata, large messages, errors, many idle streams and flow control.

Every test runs on both transports; grpc.aio's is the oracle the native one must match.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from conftest import LOOPBACK, running
from envoy.service.auth.v3 import external_auth_pb2 as apb
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2
from test_runtime import grpc_health, headers_request, process_call

from calloutkit import (
    AuthzServer,
    CalloutServer,
    add_body_mutation,
    add_header_mutation,
    deny_request,
    get_header,
    nonblocking,
)
from calloutkit.testing import check_request
from calloutkit.tyk import Hook, Object, Plugin, PluginCall, TykPluginServer
from calloutkit.tyk.testing import HttpRequest, request_object

pytestmark = pytest.mark.parametrize("transport", ["native", "grpcio"])

MIB = 1 << 20


def body_request(body: bytes) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=body))


class Echo(CalloutServer):
    """Echoes the path as a header and each body back, upper-cased; /abort and /boom fail."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sleeping = asyncio.Event()
        self.cancelled = asyncio.Event()

    @nonblocking
    def on_request_body(self, body, context):
        return add_body_mutation(body=body.body.upper())

    async def on_request_headers(self, headers, context):
        path = get_header(headers, ":path", "")
        if path == "/sleep":
            self.sleeping.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if path == "/abort":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "refused: /abort ü%")
        if path == "/boom":
            raise RuntimeError("secret internal detail")
        if path == "/metadata":
            seen = dict(context.invocation_metadata())
            await context.send_initial_metadata(
                [(f"x-initial-{i}", seen[f"x-key-{i}"]) for i in range(40)]
                + [("x-echo-bin", seen["x-blob-bin"])])
            context.set_trailing_metadata(
                [(f"x-trailing-{i}", str(i)) for i in range(40)]
                + [("x-trailing-bin", seen["x-blob-bin"][::-1])])
        return add_header_mutation(add=[("x-path", path)])


async def until(condition: Any, seconds: float = 10, what: Any = None) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition never met{'' if what is None else what()}")
        await asyncio.sleep(0.02)


def rss_mib() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) // 1024


def channel_for(server: Any, **options: Any) -> grpc.aio.Channel:
    # A connection of its own per channel (grpc shares subchannels between equal channels).
    return grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}",
                                     options=[("grpc.use_local_subchannel_pool", 1),
                                              *options.items()])


async def one_reply(channel: grpc.aio.Channel, request: pb.ProcessingRequest,
                    **kwargs: Any) -> pb.ProcessingResponse:
    call = process_call(channel)(**kwargs)
    await call.write(request)
    reply = await call.read()
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    return reply


# -- unary ------------------------------------------------------------------------------------

def tag(call: PluginCall) -> None:
    call.request.set_header("x-tagged", call.request.headers.get("x-in") or "none")


class Gate(AuthzServer):
    def on_check(self, request, context):
        return deny_request(403, body="no") if request.path.startswith("/deny") else None


async def test_unary_tyk_dispatch_authz_check_and_health_check(transport: str) -> None:
    dispatch = request_object(Hook.PRE, "tag", HttpRequest(headers=[("x-in", "abc")]))
    async with running(TykPluginServer(plugins=[Plugin("tag", tag)], **LOOPBACK,
                                       transport=transport)) as tyk, \
            running(Gate(**LOOPBACK, transport=transport)) as gate:
        async with channel_for(tyk) as channel:
            reply = await channel.unary_unary("/coprocess.Dispatcher/Dispatch")(
                dispatch.SerializeToString(), timeout=10)
            assert Object.FromString(reply).request.set_headers["x-tagged"] == "abc"
            assert await grpc_health(channel) == health_pb2.HealthCheckResponse.SERVING
        async with channel_for(gate) as channel:
            check = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")
            denied = apb.CheckResponse.FromString(
                await check(check_request(path="/deny").SerializeToString(), timeout=10))
            assert denied.denied_response.body == "no"
            allowed = apb.CheckResponse.FromString(
                await check(check_request(path="/ok").SerializeToString(), timeout=10))
            assert allowed.HasField("ok_response")
            assert await grpc_health(channel) == health_pb2.HealthCheckResponse.SERVING


# -- bidi ---------------------------------------------------------------------------------------

async def test_a_bidi_stream_of_many_messages_is_answered_in_order(transport: str) -> None:
    async with running(Echo(**LOOPBACK, transport=transport)) as server:
        async with channel_for(server) as channel:
            call = process_call(channel)()

            async def write_all() -> None:
                await call.write(headers_request("/many"))
                for i in range(3000):
                    await call.write(body_request(b"chunk %d" % i))
                await call.done_writing()

            writer = asyncio.create_task(write_all())
            first = await call.read()
            bodies = [(await call.read()).request_body.response.body_mutation.body
                      for _ in range(3000)]
            await writer
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
    assert first.request_headers.response.header_mutation.set_headers[0].header.raw_value == (
        b"/many")
    assert bodies == [b"CHUNK %d" % i for i in range(3000)]


async def test_a_client_cancel_mid_stream_ends_the_callback_and_the_server_serves_on(
        transport: str) -> None:
    async with running(Echo(**LOOPBACK, transport=transport)) as server:
        async with channel_for(server) as channel:
            call = process_call(channel)()
            await call.write(headers_request("/sleep"))
            # Cancelled once the callback runs: a stream cancelled before its callback
            # started has no callback to end.
            await asyncio.wait_for(server.sleeping.wait(), 5)
            call.cancel()
            await asyncio.wait_for(server.cancelled.wait(), 5)
            await until(lambda: server.active_streams == 0)
            reply = await one_reply(channel, headers_request("/after"))
    assert reply.request_headers.response.header_mutation.set_headers[0].header.raw_value == (
        b"/after")


async def test_the_grpc_timeout_is_honoured_on_both_sides(transport: str) -> None:
    async with running(Echo(**LOOPBACK, transport=transport)) as server:
        async with channel_for(server) as channel:
            call = process_call(channel)(timeout=0.5)
            await call.write(headers_request("/sleep"))
            assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.wait_for(server.cancelled.wait(), 5)  # the callback ended too
            await until(lambda: server.active_streams == 0)
            await one_reply(channel, headers_request("/after"))


async def test_metadata_both_ways_with_bin_keys_and_many_keys(transport: str) -> None:
    blob = bytes(range(256))
    sent = [(f"x-key-{i}", f"value {i}") for i in range(40)] + [("x-blob-bin", blob)]
    async with running(Echo(**LOOPBACK, transport=transport)) as server:
        async with channel_for(server) as channel:
            call = process_call(channel)(metadata=sent, timeout=10)
            await call.write(headers_request("/metadata"))
            await call.read()
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
            initial = list(await call.initial_metadata())
            trailing = list(await call.trailing_metadata())
    for i in range(40):
        assert (f"x-initial-{i}", f"value {i}") in initial
        assert (f"x-trailing-{i}", str(i)) in trailing
    assert ("x-echo-bin", blob) in initial
    assert ("x-trailing-bin", blob[::-1]) in trailing


# -- large messages --------------------------------------------------------------------------

async def test_30_mib_messages_both_ways_and_larger_ones_refused(transport: str) -> None:
    body = bytes(range(256)) * (30 * MIB // 256)
    server = Echo(**LOOPBACK, transport=transport, max_message_size=31 * MIB)
    async with running(server):
        async with channel_for(server, **{"grpc.max_receive_message_length": 64 * MIB,
                                          "grpc.max_send_message_length": 64 * MIB}) as channel:
            reply = await one_reply(channel, body_request(body), timeout=60)
            assert reply.request_body.response.body_mutation.body == body.upper()
            call = process_call(channel)(timeout=60)
            await call.write(body_request(b"x" * (32 * MIB)))
            assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # and the connection serves on
            await one_reply(channel, headers_request("/after"))


async def test_an_oversize_message_is_refused_from_its_prefix_before_its_body(
        transport: str) -> None:
    """The stream is ended while the client has sent only the prefix of a 100 MiB message.
    (grpc.aio's transport waits for the body first: the native transport alone does this;
    the status itself, RESOURCE_EXHAUSTED, is checked with a whole body above.)"""
    if transport == "grpcio":
        pytest.skip("grpc.aio reads the whole message before refusing it")
    server = Echo(**LOOPBACK, transport=transport, max_message_size=MIB)
    async with running(server):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.plaintext_port)
        try:
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0)
                         + h2_frame(1, 0x4, 1, request_headers(server.plaintext_port))
                         + h2_frame(0, 0, 1, b"\x00" + (100 * MIB).to_bytes(4, "big")))
            await writer.drain()
            await asyncio.wait_for(stream_1_ends(reader, writer), 10)
        finally:
            writer.close()


def h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes([kind, flags])
            + stream.to_bytes(4, "big") + payload)


def request_headers(port: int) -> bytes:
    headers = [(":method", "POST"), (":scheme", "http"),
               (":path", "/envoy.service.ext_proc.v3.ExternalProcessor/Process"),
               (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"),
               ("te", "trailers")]
    # HPACK "literal header field without indexing, new name", no Huffman coding.
    return b"".join(b"\x00" + bytes([len(k)]) + k.encode() + bytes([len(v)]) + v.encode()
                    for k, v in headers)


async def stream_1_ends(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads frames until the server ends stream 1 with its status (a HEADERS frame with
    END_STREAM), failing on a reset."""
    while True:
        head = await reader.readexactly(9)
        length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
        stream = int.from_bytes(head[5:9], "big")
        payload = await reader.readexactly(length)
        if kind == 4 and not flags & 1:
            writer.write(h2_frame(4, 1, 0))
        elif stream == 1 and kind == 3:
            raise AssertionError(f"stream reset with error {int.from_bytes(payload, 'big')}")
        elif stream == 1 and kind == 1 and flags & 1:
            return


# -- errors -----------------------------------------------------------------------------------

async def test_abort_code_and_details_and_a_raising_callback_is_internal(transport: str) -> None:
    server = Echo(**LOOPBACK, transport=transport, error_policy="abort")
    async with running(server):
        async with channel_for(server) as channel:
            call = process_call(channel)(timeout=10)
            await call.write(headers_request("/abort"))
            assert await call.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert await call.details() == "refused: /abort ü%"
            call = process_call(channel)(timeout=10)
            await call.write(headers_request("/boom"))
            assert await call.code() == grpc.StatusCode.INTERNAL
            details = await call.details()
            assert "secret" not in details and "RuntimeError" not in details


# -- many idle streams ---------------------------------------------------------------------

async def test_ten_thousand_idle_streams_are_held_then_all_answered(transport: str) -> None:
    # grpc.aio's own server here leaves some of 1,500 streams unstarted after 30 s: the
    # oracle is held to fewer, with the same checks.
    count, channels = (10_000 if transport == "native" else 500), 16
    server = Echo(**LOOPBACK, transport=transport)
    async with running(server):
        opened = [channel_for(server) for _ in range(channels)]
        try:
            started = time.monotonic()
            rss_before = rss_mib()
            calls = [process_call(opened[i % channels])(timeout=60) for i in range(count)]
            await until(lambda: server.active_streams >= count, 30,
                        lambda: f": {server.active_streams} streams open")
            held = time.monotonic() - started
            rss_held = rss_mib()

            async def answer(i: int, call: Any) -> bytes:
                await call.write(headers_request(f"/{i}"))
                reply = await call.read()
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.OK
                return bytes(reply.request_headers.response.header_mutation.set_headers[0]
                             .header.raw_value)

            paths = await asyncio.gather(*(answer(i, call) for i, call in enumerate(calls)))
            total = time.monotonic() - started
        finally:
            for channel in opened:
                await channel.close()
        await until(lambda: server.active_streams == 0)
    assert paths == [f"/{i}".encode() for i in range(count)]
    print(f"\n{transport}: {count} streams held in {held:.1f} s, all answered in {total:.1f} s;"
          f" RSS {rss_before} -> {rss_held} MiB (client and server)")
    assert total < 30


# -- flow control ------------------------------------------------------------------------------

async def test_a_client_reading_slowly_holds_the_server_back(transport: str) -> None:
    """The server answers each 1 MiB body with 1 MiB; a client that writes without reading
    must soon be held back (the server stops reading), not have the server buffer replies
    without bound. Then every reply arrives, in order."""
    count = 96
    chunk = b"a" * MIB
    async with running(Echo(**LOOPBACK, transport=transport, max_message_size=4 * MIB)) as server:
        async with channel_for(server) as channel:
            call = process_call(channel)(timeout=60)
            written = 0

            async def write_all() -> None:
                nonlocal written
                for _ in range(count):
                    await call.write(body_request(chunk))
                    written += 1
                await call.done_writing()

            writer = asyncio.create_task(write_all())
            await asyncio.sleep(3)
            assert written < count // 2, f"{written} MiB written with no reply read"
            # Reading lets the rest through.
            replies = 0
            while (reply := await call.read()) is not grpc.aio.EOF:
                assert reply.request_body.response.body_mutation.body == b"A" * MIB
                replies += 1
            await writer
            assert await call.code() == grpc.StatusCode.OK
    assert replies == count
