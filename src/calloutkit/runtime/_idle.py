"""Streams waiting for their next message: ended when idle too long, or when draining.

An ext_proc stream lives as long as its HTTP request (L7) or connection (L4), and most of
that time it waits for Envoy's next message. Such a stream is ended by cancelling the task
that runs it while it waits, and the stream loop turns that cancellation into a gRPC status
(`StreamWatch.ending`). Only a waiting stream is ever cancelled, so a callback is never cut
off halfway.

On the native transport the same two endings happen in the transport itself (a timer per
stream, moved on as each wait begins); only the status message comes from here.

The idle timer is lazy: one timer per stream, not one per message. Each message only notes
the time; when the timer fires it checks how long the stream has really waited, and sleeps
again for the rest.
"""

from __future__ import annotations

import asyncio

import grpc


def idle_message(timeout: float) -> str:
    """The status message of a stream ended by ``stream_idle_timeout``, on either transport."""
    return f"no message for {timeout:g}s (stream_idle_timeout)"


class StreamWatch:
    """One stream's state as the drain and the idle timer see it."""

    __slots__ = ("_handle", "_loop", "_task", "_timeout", "ending", "since", "waiting")

    def __init__(self, timeout: float | None) -> None:
        task = asyncio.current_task()
        assert task is not None  # grpc.aio runs each stream in a task
        self._task = task
        self._loop = task.get_loop()
        self._timeout = timeout
        self._handle: asyncio.TimerHandle | None = None
        self.waiting = False
        self.since = 0.0
        # The status the stream ends with once cancelled by us; None: not cancelled by us.
        self.ending: tuple[grpc.StatusCode, str] | None = None
        if timeout is not None:
            self._handle = self._loop.call_at(self._loop.time() + timeout, self._check)

    def end(self, code: grpc.StatusCode, details: str) -> None:
        """End the stream with ``code``; only while it waits for a message."""
        if self.ending is None and self.waiting:
            self.ending = (code, details)
            self._task.cancel()

    def uncancel(self) -> None:
        """Take back our cancellation, so the stream can still send its status."""
        self._task.uncancel()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        assert self._timeout is not None
        due = (self.since if self.waiting else self._loop.time()) + self._timeout
        if self.waiting and self._loop.time() >= due:
            self._handle = None
            self.end(grpc.StatusCode.DEADLINE_EXCEEDED, idle_message(self._timeout))
            return
        self._handle = self._loop.call_at(due, self._check)
