"""The L4 examples, each through a real Envoy (tcp_proxy) to a local TCP echo server."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from conftest import LOOPBACK, REPO, free_port, read_until, spawn, stop_process

from calloutkit.cli._loader import load_target
from calloutkit.testing import Envoy, TcpEchoServer, network_envoy_config

pytestmark = pytest.mark.envoy


def example(name: str) -> Any:
    return load_target(os.path.join(REPO, "examples", name))


@pytest.fixture(scope="module")
def echo() -> Iterator[TcpEchoServer]:
    with TcpEchoServer() as server:
        yield server


@pytest.fixture
async def through_envoy(echo: TcpEchoServer) -> AsyncIterator[Any]:
    """Start an example class in process with an Envoy in front; yield the Envoy."""
    running: list[tuple[Any, Envoy]] = []

    async def start(server_class: Any, **options: Any) -> Envoy:
        server = server_class(**LOOPBACK, **options)
        await server.start()
        envoy = Envoy(network_envoy_config(server.plaintext_port, echo.port))
        running.append((server, envoy))
        return envoy.start()

    yield start
    for server, envoy in running:
        envoy.stop()
        await server.stop(1)


async def connect(envoy: Envoy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", envoy.port)


async def send_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    *parts: bytes) -> bytes:
    """Send ``parts`` as separate writes (a pause between them), read one line back."""
    for n, part in enumerate(parts):
        if n:
            await asyncio.sleep(0.05)
        writer.write(part)
        await writer.drain()
    return await asyncio.wait_for(reader.readline(), 10)


async def test_passthrough_logger_runs_with_calloutkit_serve(echo):
    port = free_port()
    process = spawn([sys.executable, "-m", "calloutkit", "serve",
                     "examples/l4_passthrough_logger", "--plaintext_address",
                     f"127.0.0.1:{port}", "--disable_tls", "--combined_health_check"],
                    env={"PYTHONUNBUFFERED": "1"})
    try:
        await asyncio.to_thread(read_until, process, "PassthroughLogger serving")
        with Envoy(network_envoy_config(port, echo.port)) as envoy:
            reader, writer = await connect(envoy)
            assert await send_line(reader, writer, b"hello there\n") == b"hello there\n"
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            assert echo.received[-1] == b"hello there\n"
        line = await asyncio.to_thread(read_until, process, "client->upstream 12 bytes")
        assert "connection 1" in line and "hello there" in line
        await asyncio.to_thread(read_until, process, "upstream->client 12 bytes")
        await asyncio.to_thread(read_until, process, "client->upstream 0 bytes (end of stream)")
    finally:
        stop_process(process)


async def test_rewrite_changes_lengths_both_ways(through_envoy, echo):
    envoy = await through_envoy(example("l4_rewrite"))
    reader, writer = await connect(envoy)
    # the client never sees the tenant prefix that the store does
    assert await send_line(reader, writer, b"GET user:42\r\n") == b"GET user:42\r\n"
    assert echo.received[-1] == b"GET tenant-a:user:42\r\n"
    # a pattern split across two chunks is still rewritten
    assert await send_line(reader, writer, b"SET us", b"er:7 x\r\n") == b"SET user:7 x\r\n"
    writer.close()
    assert echo.received[-1] == b"GET tenant-a:user:42\r\nSET tenant-a:user:7 x\r\n"


async def test_rewrite_leaves_other_bytes_alone(through_envoy, echo):
    envoy = await through_envoy(example("l4_rewrite"))
    reader, writer = await connect(envoy)
    assert await send_line(reader, writer, b"PING users\r\n") == b"PING users\r\n"
    writer.close()
    assert echo.received[-1] == b"PING users\r\n"


async def test_block_command_closes_before_the_store_sees_it(through_envoy, echo):
    envoy = await through_envoy(example("l4_block_command"))
    reader, writer = await connect(envoy)
    ping = b"*1\r\n$4\r\nPING\r\n"
    writer.write(ping)
    assert await asyncio.wait_for(reader.readexactly(len(ping)), 10) == ping
    writer.write(b"*1\r\n$8\r\nflushall\r\n")
    assert await asyncio.wait_for(reader.read(100), 10) == b""  # FIN
    writer.close()
    assert echo.received[-1] == ping

    reader, writer = await connect(envoy)  # inline commands too; other connections are fine
    assert await send_line(reader, writer, b"GET FLUSHALL\r\n") == b"GET FLUSHALL\r\n"
    writer.write(b"FLUSHDB\r\n")
    assert await asyncio.wait_for(reader.read(100), 10) == b""
    writer.close()
    assert echo.received[-1] == b"GET FLUSHALL\r\n"


async def test_block_command_can_reset_instead(through_envoy):
    base = example("l4_block_command")
    envoy = await through_envoy(type("ResetBlock", (base,), {"RESET": True}))
    reader, writer = await connect(envoy)
    writer.write(b"FLUSHALL\r\n")
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(100), 10)
    writer.close()


async def test_redact_masks_card_numbers_in_responses_only(through_envoy, echo):
    envoy = await through_envoy(example("l4_redact"))
    reader, writer = await connect(envoy)
    line = b"pay 4111 1111 1111 1111 now, ref 1234 5678 9012 3456\n"
    assert await send_line(reader, writer, line) == (
        b"pay **** **** **** 1111 now, ref 1234 5678 9012 3456\n")  # the ref fails Luhn
    assert echo.received[-1] == line  # requests pass untouched
    # split across chunks (the echo sends each part back as it comes)
    assert await send_line(reader, writer, b"amex 3782 8224", b"63 10005\n") == (
        b"amex **** ****** *0005\n")
    writer.close()
