"""Hold many idle ext_proc streams open against a server, then prove every one still answers.

    python bench/idle_streams.py PORT STREAMS

Each stream sends the request headers and gets its reply, then stays open as a real Envoy
stream does while the upstream thinks. Once all are held the client prints ``HELD n`` and
waits for a line on stdin (the runner measures the server's memory meanwhile); then each
stream sends its response headers, must get the reply, and ends. Prints ``ANSWERED n``.
Streams are spread over several connections, as several Envoy workers would spread them.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
PER_CONNECTION = 1000
OPENING = 200  # streams opened at a time


def _request(phase: str) -> pb.ProcessingRequest:
    request = pb.ProcessingRequest()
    headers = getattr(request, phase)
    header = headers.headers.headers.add()
    header.key, header.raw_value = (":path", b"/idle") if phase == "request_headers" else (
        ":status", b"200")
    return request


async def main(port: int, count: int) -> None:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                          options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range((count + PER_CONNECTION - 1) // PER_CONNECTION)]
    first, second = _request("request_headers"), _request("response_headers")
    calls: list[Any] = []
    gate = asyncio.Semaphore(OPENING)

    async def open_one(index: int) -> None:
        async with gate:
            call = channels[index // PER_CONNECTION].stream_stream(
                METHOD, request_serializer=pb.ProcessingRequest.SerializeToString,
                response_deserializer=pb.ProcessingResponse.FromString)()
            await call.write(first)
            reply = await call.read()
            if not reply.HasField("request_headers"):
                raise SystemExit(f"stream {index}: unexpected reply {reply}")
            calls.append(call)

    await asyncio.gather(*(open_one(i) for i in range(count)))
    print(f"HELD {len(calls)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    async def finish(call: Any) -> int:
        async with gate:
            await call.write(second)
            reply = await call.read()
            await call.done_writing()
            await call.code()
            return 1 if reply.HasField("response_headers") else 0

    answered = sum(await asyncio.gather(*(finish(c) for c in calls)))
    print(f"ANSWERED {answered}", flush=True)
    for channel in channels:
        await channel.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
