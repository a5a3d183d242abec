"""One stream against an in-process server: the server's own handler over two queues.

What the in-process clients of every protocol (`CalloutClient`, `NetworkCalloutClient`)
stand on: no sockets, no gRPC, the same dispatch, reply shaping and error policy as under a
gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc


class StreamEnded(Exception):
    """The server ended the stream with a gRPC status instead of answering."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class _FakeContext:
    """The part of `grpc.aio.ServicerContext` a callout may touch, for in-process streams."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return "in-process"

    def time_remaining(self) -> float | None:
        return None

    def cancelled(self) -> bool:
        return False

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise StreamEnded(code, details)


class InProcessStream:
    """One stream against an in-process server: the server's own handler over two queues.

    The shared plumbing of `CalloutStream` and the network client's stream: a server task
    reading an inbox and filling an outbox, `close`, and ``async with``.
    """

    def __init__(self, server: Any, metadata: Sequence[tuple[str, str]]) -> None:
        self._server = server
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        self._consumed = asyncio.Event()
        self._task = asyncio.ensure_future(self._run(_FakeContext(metadata)))

    async def _requests(self) -> AsyncIterator[Any]:
        while True:
            self._consumed.set()  # asking for the next message means the last one is done
            request = await self._inbox.get()
            if request is None:
                return
            self._consumed.clear()
            yield request.SerializeToString()  # the server parses, as it does off the wire

    async def _run(self, context: _FakeContext) -> None:
        try:
            async for response in self._server._stream(self._requests(), context):
                await self._outbox.put(response)
        except BaseException as exc:  # handed to the caller of send()
            await self._outbox.put(exc)
        else:
            await self._outbox.put(StreamEnded(grpc.StatusCode.OK, "stream ended"))

    async def _exchange(self, request: Any, expect_reply: bool = True) -> Any:
        """Send one request; return its reply.

        ``expect_reply=False`` also returns None when the server handled the request without
        replying: the server asks for the next message only after it has queued its reply,
        so an empty outbox by then means there is none.
        """
        self._consumed.clear()
        await self._inbox.put(request)
        if not expect_reply:
            waiter = asyncio.ensure_future(self._consumed.wait())
            await asyncio.wait([waiter, self._task], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if self._outbox.empty():
                return None
        return self._raise(await self._outbox.get())

    @staticmethod
    def _raise(item: Any) -> Any:
        if isinstance(item, BaseException):
            raise item
        return item

    async def close(self) -> None:
        """Half-close the stream and wait for the server to finish it."""
        await self._inbox.put(None)
        await asyncio.gather(self._task, return_exceptions=True)

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
