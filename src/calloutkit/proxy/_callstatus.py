"""The status a backend really sent on a call the proxy was still writing to.

grpc.aio records a failed write as the call's status: INTERNAL "Internal error from Core",
over the backend's status when that came first, or before it when the write failed first (the
backend's status then replaces it a moment later). A proxy writes the client's next message
whenever it arrives, so a backend that ends a call without reading the whole request (an
early OK, or an error) races that write. `StatusWatch` keeps the status that arrived first and,
when the failed write won the race, waits for the backend's own, so the client gets exactly
what the backend sent: code, details and trailers.

Reading responses with the call's async iterator, not ``read()``, matters too: ``read()``
refuses to return messages still buffered once any status is recorded, the iterator does not.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, NamedTuple

import grpc

_FROM_CORE = "Internal error from Core"  # what grpc.aio records for a failed write
#: How long to wait for the backend's status after a failed write was recorded first: it
#: follows within a turn or two of the event loop, this only bounds a surprise.
_REAL_STATUS_WAIT = 2.0


class FinalStatus(NamedTuple):
    """How a backend call ended."""

    code: grpc.StatusCode
    details: str
    initial_metadata: Any
    trailing_metadata: Any
    debug_error_string: str

    def error(self) -> grpc.aio.AioRpcError:
        """The status as the error grpc.aio would have raised for it."""
        return grpc.aio.AioRpcError(self.code, self.initial_metadata, self.trailing_metadata,
                                    self.details, self.debug_error_string)

    @property
    def from_failed_write(self) -> bool:
        return (self.code is grpc.StatusCode.INTERNAL and self.details == _FROM_CORE
                and not self.trailing_metadata)


def _at_once(coro: Coroutine[Any, Any, Any]) -> Any:
    # A finished call's status getters never suspend: run them to completion right here, in
    # the done callback, before a later write failure can overwrite what they return.
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("call status not available yet")


def _snapshot(call: Any) -> FinalStatus:
    return FinalStatus(_at_once(call.code()), _at_once(call.details()) or "",
                       _at_once(call.initial_metadata()), _at_once(call.trailing_metadata()),
                       _at_once(call.debug_error_string()) or "")


class StatusWatch:
    """Watches one outgoing stream call for the status its backend sent.

    Set ``write_failed`` when a write to the call raised: only then can a recorded
    INTERNAL "Internal error from Core" be grpc.aio's and not the backend's.
    """

    __slots__ = ("_call", "_first", "write_failed")

    def __init__(self, call: Any) -> None:
        self._call = call
        self._first: FinalStatus | None = None
        self.write_failed = False
        call.add_done_callback(self._on_done)

    def _on_done(self, call: Any) -> None:
        if self._first is None:
            with contextlib.suppress(RuntimeError):
                self._first = _snapshot(call)

    async def final(self) -> FinalStatus:
        """The backend's status; call once the call is done."""
        first = self._first
        if first is None:
            call = self._call
            first = FinalStatus(await call.code(), await call.details() or "",
                                await call.initial_metadata(), await call.trailing_metadata(),
                                await call.debug_error_string() or "")
        if not (self.write_failed and first.from_failed_write):
            return first
        # The failed write was recorded first; the backend's status replaces it when it comes.
        loop = asyncio.get_running_loop()
        until = loop.time() + _REAL_STATUS_WAIT
        while loop.time() < until:
            await asyncio.sleep(0.001)
            current = _snapshot(self._call)
            if not current.from_failed_write:
                return current
        return first
