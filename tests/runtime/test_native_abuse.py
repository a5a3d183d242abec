"""HTTP/2 abuse against the native transport, from raw sockets: the offending connection is
closed or held at no cost, the process survives, and a gRPC client on another connection is
served meanwhile."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable

import grpc
import pytest
from conftest import LOOPBACK, running
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from calloutkit import CalloutServer, add_header_mutation, get_header
from calloutkit.testing import http_headers

# Every server here names its transport.
pytestmark = pytest.mark.own_transport


METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, GOAWAY, CONTINUATION = 0, 1, 3, 4, 7, 9
END_STREAM, END_HEADERS = 0x1, 0x4
BIG_REPLY = 256 << 10


class Echo(CalloutServer):
    """Answers request headers; ``/big`` asks for a reply of `BIG_REPLY` bytes."""

    def on_request_headers(self, headers, context):
        if get_header(headers, ":path", "") == "/big":
            return add_header_mutation(add=[("x-big", "b" * BIG_REPLY)])
        return add_header_mutation(add=[("x-seen", "yes")])


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + \
        struct.pack(">I", stream) + payload


def _hpack_length(n: int) -> bytes:
    if n < 127:
        return bytes([n])
    out, n = bytearray([127]), n - 127
    while n >= 128:
        out.append(n % 128 | 128)
        n //= 128
    return bytes(out + bytes([n]))


def hpack(headers: list[tuple[str, str]]) -> bytes:
    """A header block of literals without indexing, new names, no Huffman."""
    out = bytearray()
    for name, value in headers:
        out += b"\x00" + _hpack_length(len(name)) + name.encode()
        out += _hpack_length(len(value)) + value.encode()
    return bytes(out)


REQUEST = hpack([(":method", "POST"), (":scheme", "http"), (":path", METHOD),
                 (":authority", "test"), ("content-type", "application/grpc"),
                 ("te", "trailers")])


def grpc_message(request: pb.ProcessingRequest) -> bytes:
    data = request.SerializeToString()
    return b"\x00" + struct.pack(">I", len(data)) + data


def attacker(port: int, settings: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(PREFACE + frame(SETTINGS, 0, 0, settings))
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """What the server sent until it closed the connection (AssertionError if it did not)."""
    sock.settimeout(timeout)
    received = bytearray()
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError("the server kept the connection open") from None
    return bytes(received)


def goaway_codes(received: bytes) -> list[int]:
    codes, at = [], 0
    while at + 9 <= len(received):
        length = int.from_bytes(received[at:at + 3], "big")
        if received[at + 3] == GOAWAY:
            codes.append(int.from_bytes(received[at + 13:at + 17], "big"))
        at += 9 + length
    return codes


async def no_stream_left(server: CalloutServer) -> bool:
    """True once the server has no stream in flight (a cancelled one takes a moment)."""
    for _ in range(100):
        if server.active_streams == 0:
            return True
        await asyncio.sleep(0.05)
    return False


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


async def served_meanwhile(port: int, attack: Callable[[], object],
                           ) -> tuple[object, list[float]]:
    """Run ``attack`` in a thread while a grpcio client on its own connection keeps asking;
    return the attack's result and every answer's latency (the first before the attack)."""
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(METHOD,
                                     request_serializer=pb.ProcessingRequest.SerializeToString,
                                     response_deserializer=pb.ProcessingResponse.FromString)

        async def ask() -> None:
            started = time.monotonic()
            request = pb.ProcessingRequest(request_headers=http_headers({":path": "/"}, True))
            stream = call(timeout=10)
            await stream.write(request)
            reply = await stream.read()
            stream.cancel()
            assert reply.request_headers.response.header_mutation.set_headers[0].header.key \
                == "x-seen"
            latencies.append(time.monotonic() - started)

        await ask()
        attack_done = asyncio.ensure_future(asyncio.to_thread(attack))
        while not attack_done.done():
            await ask()
            await asyncio.sleep(0.02)
        result = await attack_done
        await ask()
    return result, latencies


async def test_rapid_reset_neither_stops_others_nor_the_server():
    async with running(Echo(**LOOPBACK, transport="native")) as server:
        port = server.plaintext_port

        def attack() -> tuple[int, bytes]:
            sock = attacker(port)
            sent = 0
            try:
                batch = bytearray()
                for n in range(20_000):
                    stream = 2 * n + 1
                    batch += frame(HEADERS, END_HEADERS, stream, REQUEST)
                    batch += frame(RST_STREAM, 0, stream, struct.pack(">I", 8))  # CANCEL
                    if len(batch) > 64 << 10:
                        sock.sendall(batch)
                        sent, batch = n + 1, bytearray()
                sock.sendall(batch)
                sent = 20_000
                sock.shutdown(socket.SHUT_WR)
                return sent, read_until_closed(sock, 10)
            except (BrokenPipeError, ConnectionResetError):
                return sent, b""
            finally:
                sock.close()

        (sent, _), latencies = await served_meanwhile(port, attack)
        assert sent > 1000
        assert len(latencies) >= 3 and max(latencies) < 1.0, latencies
        assert await no_stream_left(server)  # none of the reset streams lingers


async def test_a_header_flood_is_refused_without_holding_memory():
    async with running(Echo(**LOOPBACK, transport="native")) as server:
        port = server.plaintext_port
        before = rss_kib()

        def continuation_flood() -> tuple[int, list[int]]:
            # One header block that never ends: 1 KiB CONTINUATION frames, up to 64 MiB.
            sock = attacker(port)
            sent = 0
            try:
                sock.sendall(frame(HEADERS, 0, 1, REQUEST))
                chunk = frame(CONTINUATION, 0, 1, b"\x00\x01a\x7f" + b"v" * 1020) * 64
                for _ in range(1024):
                    sock.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                return sent, goaway_codes(read_until_closed(sock, 10))
            finally:
                sock.close()

        def huge_header() -> bytes:
            # One complete block far over the limit: that stream is refused.
            sock = attacker(port)
            try:
                block = REQUEST + hpack([("x-huge", "h" * (1 << 20))])
                frames = [frame(HEADERS if i == 0 else CONTINUATION,
                                END_HEADERS if i + 16384 >= len(block) else 0, 1,
                                block[i:i + 16384]) for i in range(0, len(block), 16384)]
                sock.sendall(b"".join(frames))
                sock.settimeout(5)
                return sock.recv(65536)
            except (BrokenPipeError, ConnectionResetError):
                return b""
            finally:
                sock.close()

        (sent, codes), latencies = await served_meanwhile(port, continuation_flood)
        assert sent < 8 << 20  # closed long before the flood's 64 MiB
        assert codes and codes[0] != 0, codes  # GOAWAY with an error
        _, more = await served_meanwhile(port, huge_header)
        assert max(latencies + more) < 1.0
        assert rss_kib() - before < 32 << 10


async def test_a_peer_that_never_opens_its_window_costs_one_reply_not_all():
    async with running(Echo(**LOOPBACK, transport="native")) as server:
        port = server.plaintext_port
        big = grpc_message(pb.ProcessingRequest(
            request_headers=http_headers({":path": "/big"}, False)))
        before = rss_kib()
        grown: list[int] = []

        def attack() -> None:
            # SETTINGS_INITIAL_WINDOW_SIZE 0: the server may send no DATA at all. 400
            # requests each asking for 256 KiB would be 100 MiB of replies if buffered.
            sock = attacker(port, struct.pack(">HI", 4, 0))
            try:
                sock.sendall(frame(HEADERS, END_HEADERS, 1, REQUEST))
                sock.settimeout(0.5)
                for _ in range(400):
                    sock.sendall(frame(DATA, 0, 1, big))
            except TimeoutError:
                pass  # the server stopped reading this stream: its window is full
            time.sleep(1.0)
            grown.append(rss_kib() - before)
            sock.close()

        _, latencies = await served_meanwhile(port, attack)
        assert grown[0] < 32 << 10, f"RSS grew {grown[0]} KiB"
        assert max(latencies) < 1.0
        assert await no_stream_left(server)  # closing the connection ended the held stream


async def test_garbage_and_invalid_frames_close_that_connection_only():
    async with running(Echo(**LOOPBACK, transport="native")) as server:
        port = server.plaintext_port
        attacks = {
            "not HTTP/2": b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
            "random bytes": bytes(range(256)) * 64,
            "DATA on stream 0": PREFACE + frame(SETTINGS, 0, 0) + frame(DATA, 0, 0, b"x"),
            "frame too large": PREFACE + frame(SETTINGS, 0, 0) +
            frame(HEADERS, END_HEADERS, 1, b"\x00" * 20000),
            "bad HPACK": PREFACE + frame(SETTINGS, 0, 0) +
            frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\xff\xff"),
            "SETTINGS of odd length": PREFACE + frame(SETTINGS, 0, 0, b"\x00\x01\x00"),
        }

        def attack() -> dict[str, bool]:
            closed = {}
            for name, data in attacks.items():
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    sock.sendall(data)
                    try:
                        read_until_closed(sock, 5)
                        closed[name] = True
                    except AssertionError:
                        closed[name] = False
            return closed

        closed, latencies = await served_meanwhile(port, attack)
        assert closed == dict.fromkeys(attacks, True)
        assert max(latencies) < 1.0
