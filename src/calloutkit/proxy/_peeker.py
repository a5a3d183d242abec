"""The peeker: lets a director read the first request message before choosing a backend.

Peeking is idempotent (the first call reads, later calls return the same frame) and safe on an
empty stream (it returns None when the client half-closed without sending anything). The frame
is not lost: the proxy sends it first to every destination, unless a `Destination` supplies its
own ``msg``. A director that never peeks leaves the stream untouched.
"""

from __future__ import annotations

from typing import Any

import grpc


class Peeker:
    """Reads (at most) the first request message of a call, once.

    Example::

        async def director(method, context, peeker):
            first = await peeker.peek()          # bytes, or None for an empty stream
            api_id = MyRequest.FromString(first or b"").api_id
            ...
    """

    __slots__ = ("_context", "_frame", "_peeked")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any] | None,
                 frame: bytes | None = None) -> None:
        self._context = context
        self._frame = frame
        # A unary call's only request is already in hand: nothing left to read.
        self._peeked = context is None

    @classmethod
    def of_request(cls, request: bytes) -> Peeker:
        """A peeker over a unary call's request (no I/O)."""
        return cls(None, request)

    @property
    def peeked(self) -> bool:
        """True once the first frame was taken from a client stream (or it was found empty):
        the proxy then replays it. Always False for a unary call, whose request is in hand."""
        return self._peeked and self._context is not None

    @property
    def frame(self) -> bytes | None:
        """The peeked frame, None if nothing was read or the stream was empty."""
        return self._frame

    async def peek(self) -> bytes | None:
        """The first request message, reading it from the client on the first call."""
        if not self._peeked:
            assert self._context is not None
            frame = await self._context.read()
            self._frame = None if frame is grpc.aio.EOF else frame
            self._peeked = True
        return self._frame
