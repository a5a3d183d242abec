"""Send raw messages to one gRPC method, each on a call of its own, and report every outcome.

    python raw_client.py PORT METHOD unary|stream MESSAGES OUTCOMES

MESSAGES holds the messages, each a 4-byte big-endian length and its bytes. OUTCOMES gets one
JSON line per message, in order: the status code's name, its details and the replies
(base64). A process of its own, so the server under test and its client use a core each.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
from typing import Any

import grpc

CONCURRENCY = 64


def read_messages(path: str) -> list[bytes]:
    with open(path, "rb") as handle:
        data = handle.read()
    messages, at = [], 0
    while at < len(data):
        size = int.from_bytes(data[at:at + 4], "big")
        messages.append(data[at + 4:at + 4 + size])
        at += 4 + size
    return messages


async def send_all(port: int, method: str, streaming: bool,
                   messages: list[bytes]) -> list[dict[str, Any]]:
    gate = asyncio.Semaphore(CONCURRENCY)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = channel.stream_stream(method)
        unary = channel.unary_unary(method)

        async def one(data: bytes) -> dict[str, Any]:
            async with gate:
                replies: list[bytes] = []
                call: Any
                if streaming:
                    call = stream(iter([data]), timeout=60)
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        replies = [reply async for reply in call]
                else:
                    call = unary(data, timeout=60)
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        replies = [await call]
                return {"code": (await call.code()).name, "details": await call.details() or "",
                        "replies": [base64.b64encode(r).decode() for r in replies]}

        return await asyncio.gather(*(one(data) for data in messages))


def main() -> None:
    port, method, kind, source, target = sys.argv[1:]
    outcomes = asyncio.run(send_all(int(port), method, kind == "stream", read_messages(source)))
    with open(target, "w") as handle:
        for outcome in outcomes:
            handle.write(json.dumps(outcome) + "\n")


if __name__ == "__main__":
    main()
