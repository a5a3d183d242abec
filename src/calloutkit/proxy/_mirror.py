"""Secondary legs: copies of the request stream whose responses are discarded.

Two modes, chosen per call by `StreamParameters.wait_for_secondaries`:

- **mirror** (default): a secondary runs in the background, in a task owned by its
  `MirrorPolicy`. It has a bounded queue (a lagging mirror is cut off, never waited for), its
  own timeout, and a cap on how many mirrored calls may be in flight; whatever goes wrong is
  reported to its ``err_handler`` and costs the client nothing.
- **wait**: the call ends only when every secondary has ended, and an error that its
  ``err_handler`` does not swallow fails the call.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

import grpc

from ._callstatus import StatusWatch
from ._director import Destination, MirrorPolicy, Overflow, ProxyError

logger = logging.getLogger(__name__)


async def call_err_handler(dst: Destination, error: BaseException) -> BaseException | bytes | None:
    """Run ``dst.err_handler`` on ``error``: its verdict, or the error itself without one."""
    handler = dst.err_handler
    if handler is None:
        return error
    try:
        verdict = handler(error)
        if inspect.isawaitable(verdict):
            verdict = await verdict
    except ProxyError as exc:
        return exc
    except Exception as exc:
        logger.exception("err_handler failed on %r", error)
        return exc
    if verdict is None or isinstance(verdict, BaseException | bytes):
        return verdict
    logger.warning("err_handler returned %s; expected an exception, bytes or None",
                   type(verdict).__name__)
    return error


def finish(dst: Destination, code: grpc.StatusCode) -> None:
    """Tell ``dst.on_finish`` how its leg ended (exactly once per leg)."""
    if dst.on_finish is not None:
        try:
            dst.on_finish(code)
        except Exception:
            logger.exception("on_finish failed")


def error_code(error: BaseException) -> grpc.StatusCode:
    """The gRPC status code an error stands for."""
    if isinstance(error, ProxyError):
        return error.code
    if isinstance(error, grpc.RpcError):
        code = error.code()
        if isinstance(code, grpc.StatusCode):
            return code
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def task_cancelled() -> bool:
    """True when the running task itself was cancelled (not merely a call it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Leg:
    """One secondary: its call, the queue feeding it, and the task draining its responses."""

    __slots__ = ("_call", "_closed", "_forced", "_queue", "_sender", "_task", "_watch",
                 "_writing", "dead", "dst", "error", "overflow")

    def __init__(self, dst: Destination, overflow: Overflow) -> None:
        self.dst = dst
        self.overflow = overflow
        self.error: BaseException | None = None  # after err_handler; None if OK or swallowed
        self.dead = False
        self._forced: BaseException | None = None
        self._closed = False
        self._call: Any = None
        self._queue: asyncio.Queue[bytes | None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._watch: StatusWatch | None = None
        self._writing = False

    # -- starting ---------------------------------------------------------------------------

    def start(self, call: Any, queue_size: int, policy: MirrorPolicy | None) -> None:
        """Run the leg on ``call`` (unary or stream); with ``policy``, as a background mirror."""
        self._call = call
        if isinstance(call, grpc.aio.UnaryUnaryCall):
            self._task = asyncio.ensure_future(self._drain_unary())
        else:
            self._queue = asyncio.Queue(queue_size)
            self._watch = StatusWatch(call)
            self._sender = asyncio.ensure_future(self._send_loop())
            self._task = asyncio.ensure_future(self._drain_stream())
        if policy is not None:
            policy._track(self._task)

    async def refuse(self, error: BaseException) -> None:
        """The leg could not start: report ``error`` as its outcome."""
        self.dead = True
        await self._conclude(error)

    # -- feeding (stream legs) -----------------------------------------------------------------

    async def send(self, frame: bytes) -> None:
        """Queue one request frame for this leg (BLOCK waits for room, DROP cuts it off)."""
        if self.dead or self._closed or self._queue is None:
            return
        if self.overflow is Overflow.BLOCK:
            await self._queue.put(frame)
        elif self._queue.full():
            self.abort(ProxyError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"secondary fell behind: {self._queue.maxsize} messages "
                                  "queued; cut off"))
        else:
            self._queue.put_nowait(frame)

    def close_input(self) -> None:
        """No more request frames: half-close the leg once its queue is sent."""
        if self._closed or self._queue is None:
            return
        self._closed = True
        if not self._queue.full():
            self._queue.put_nowait(None)

    def abort(self, error: BaseException) -> None:
        """End the leg now; ``error`` is what its ``err_handler`` will see."""
        if self.dead:
            return
        self._forced = error
        if self._call is not None:
            self._call.cancel()
        self._release()

    async def wait(self) -> BaseException | None:
        """Wait for the leg to end; its error after ``err_handler`` (None: OK or swallowed)."""
        if self._task is not None:
            await asyncio.shield(self._task)
        return self.error

    # -- internals ---------------------------------------------------------------------------

    def _release(self) -> None:
        self.dead = True
        queue = self._queue
        if queue is not None:
            while not queue.empty():  # unblock a BLOCK-mode pump waiting for room
                queue.get_nowait()

    async def _send_loop(self) -> None:
        assert self._queue is not None
        call = self._call
        try:
            while True:
                frame = await self._queue.get()
                if frame is None or self.dead:
                    break
                self._writing = True
                await call.write(frame)
                self._writing = False
                if self._closed and self._queue.empty():
                    break
            if not self.dead:
                await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            # The call already ended; the drain side reports how.
            if self._watch is not None:
                self._watch.write_failed = True

    async def _drain_stream(self) -> None:
        call = self._call
        error: BaseException | None = None
        try:
            # The iterator, not read(): see _callstatus.
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            error = await self._real_error(exc)
        except asyncio.CancelledError:
            if task_cancelled():
                self._release()
                call.cancel()
                if self._sender is not None:
                    self._sender.cancel()
                    await asyncio.gather(self._sender, return_exceptions=True)
                await self._conclude(ProxyError(grpc.StatusCode.CANCELLED, "mirror cancelled"))
                raise
            error = ProxyError(grpc.StatusCode.CANCELLED, "call cancelled")  # channel closed
        finally:
            self._release()
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        await self._conclude(self._forced or error)

    async def _real_error(self, error: BaseException) -> BaseException | None:
        """The status the call really ended with, not a write's failure recorded over it.

        A mirror that stops reading (stuck, or cut off by its timeout) leaves a write in
        flight; grpc.aio then records INTERNAL "Internal error from Core" in place of the
        timeout or the backend's own status.
        """
        watch = self._watch
        if watch is None:
            return error
        if self._writing:  # the sender has not seen its write fail yet, but it will
            watch.write_failed = True
        final = await watch.final()
        if final.code is grpc.StatusCode.OK:
            return None
        real: BaseException = final.error()
        return real

    async def _drain_unary(self) -> None:
        error: BaseException | None = None
        try:
            await self._call
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:
            if task_cancelled():
                self._release()
                self._call.cancel()
                await self._conclude(ProxyError(grpc.StatusCode.CANCELLED, "mirror cancelled"))
                raise
            error = ProxyError(grpc.StatusCode.CANCELLED, "call cancelled")
        self._release()
        await self._conclude(self._forced or error)

    async def _conclude(self, error: BaseException | None) -> None:
        if error is None:
            finish(self.dst, grpc.StatusCode.OK)
            return
        finish(self.dst, error_code(error))
        verdict = await call_err_handler(self.dst, error)
        if isinstance(verdict, BaseException):
            self.error = verdict
        elif verdict is not None:
            logger.warning("a secondary's err_handler returned bytes; ignored")
        if self.error is not None:
            logger.debug("secondary failed: %s", self.error)
