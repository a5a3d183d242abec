"""Idle streams: ended after stream_idle_timeout, and never holding a drain for its grace."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from conftest import LOOPBACK
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from calloutkit import CalloutServer, ConfigError, ServerConfig, add_header_mutation
from calloutkit.testing import http_headers

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


def headers(path: str = "/") -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_headers=http_headers({":path": path}, False))


class Slow(CalloutServer):
    """Answers ``/slow`` only once the test lets it; everything else at once."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def on_request_headers(self, headers: pb.HttpHeaders, context: Any) -> Any:
        path = next(h.raw_value for h in headers.headers.headers if h.key == ":path")
        if path.startswith(b"/slow"):
            self.entered.set()
            await self.release.wait()
        return add_header_mutation(add=[("x-seen", path.decode())])


def open_stream(channel: grpc.aio.Channel) -> Any:
    call = channel.stream_stream(METHOD, request_serializer=pb.ProcessingRequest.SerializeToString,
                                 response_deserializer=pb.ProcessingResponse.FromString)
    return call()


async def ended_with(call: Any) -> tuple[grpc.StatusCode, str, float]:
    """Wait for the stream's status; return it with the seconds it took."""
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    return caught.value.code(), caught.value.details() or "", time.monotonic() - started


TRANSPORTS = ["grpcio", "native"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_stream_without_messages_for_the_idle_timeout_ends(transport: str) -> None:
    server = Slow(**LOOPBACK, stream_idle_timeout=0.6, transport=transport)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
            idle, busy = open_stream(channel), open_stream(channel)
            for call in (idle, busy):
                await call.write(headers())
                assert (await call.read()).HasField("request_headers")
            # A stream that keeps talking outlives the timeout several times over...
            for _ in range(6):
                await asyncio.sleep(0.3)
                await busy.write(headers())
                assert (await busy.read()).HasField("request_headers")
            # ... and a callback running longer than the timeout is not an idle stream.
            await busy.write(headers("/slow"))
            await server.entered.wait()
            code, details, _ = await ended_with(idle)
            assert code is grpc.StatusCode.DEADLINE_EXCEEDED
            assert details == "no message for 0.6s (stream_idle_timeout)"
            await asyncio.sleep(0.5)
            server.release.set()
            reply = await busy.read()
            assert reply.request_headers.response.header_mutation.set_headers[0].header \
                .raw_value == b"/slow"
            await busy.done_writing()
            assert await busy.read() is grpc.aio.EOF
            assert await busy.code() is grpc.StatusCode.OK
        assert server.active_streams == 0
    finally:
        await server.stop(1)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_drain_ends_idle_streams_at_once_and_gives_busy_ones_the_grace(
        transport: str) -> None:
    server = Slow(**LOOPBACK, grace_period=30, transport=transport)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
        idle, busy = open_stream(channel), open_stream(channel)
        await idle.write(headers())
        assert (await idle.read()).HasField("request_headers")
        await busy.write(headers("/slow"))
        await server.entered.wait()
        started = time.monotonic()
        stopping = asyncio.ensure_future(server.stop())
        code, details, took = await ended_with(idle)
        assert (code, details) == (grpc.StatusCode.UNAVAILABLE, "server is draining")
        assert took < 2 and not stopping.done()  # the busy stream holds the drain
        await asyncio.sleep(0.5)
        server.release.set()
        reply = await busy.read()  # the callback got its time and its reply went out
        assert reply.request_headers.response.header_mutation.set_headers[0].header \
            .raw_value == b"/slow"
        code, details, _ = await ended_with(busy)  # then it waits no longer than that
        assert (code, details) == (grpc.StatusCode.UNAVAILABLE, "server is draining")
        await asyncio.wait_for(stopping, 5)
        assert time.monotonic() - started < 5  # far from the 30 s grace


def test_stream_idle_timeout_is_checked() -> None:
    with pytest.raises(ConfigError, match="stream_idle_timeout must be >= 0"):
        ServerConfig.build(**LOOPBACK, stream_idle_timeout=-1)
    assert ServerConfig.build(**LOOPBACK).stream_idle_timeout is None
    assert ServerConfig.build(**LOOPBACK, stream_idle_timeout=0).stream_idle_timeout is None
    assert ServerConfig.build(**LOOPBACK, stream_idle_timeout=5).stream_idle_timeout == 5.0
