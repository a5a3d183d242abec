"""The Python side of the native transport (``transport="native"``).

The transport (`calloutkit_native`, Rust: the calloutkit-native distribution) runs HTTP/2 on
one thread of its own and calls Python once per message, with the GIL taken for that call
only. What it calls is built here from the same method table grpc.aio serves:

- a bidi ``Process`` method made by `BaseServer._stream_function`: per stream, an object whose
  ``on_message(bytes)`` runs the protocol's answer function and returns the reply's bytes,
  None, or `PENDING`; ``on_end()`` runs when the stream ends, however it ends;
- a unary method taking and returning bytes (Tyk, ext_authz, gRPC health ``Check``):
  ``handler(call, bytes)`` returning the reply's bytes or `PENDING`;
- gRPC health ``Watch`` (`NativeHealth`), server streaming: it sends each status with
  ``Call.send`` when it changes, from whichever thread changed it.

`PENDING` means the answer will come later, through the call (`Call.reply` / `Call.finish`,
safe from any thread). ``@nonblocking`` callbacks run inline on the transport thread and
``async def`` ones on the server's event loop. A ``def`` callback's answer does not touch the
loop: the transport thread steps the answer's coroutine itself (`_Driver`) up to the pool
call, a pool thread runs the callback and then the rest of the coroutine (the reply, the
error policy), and hands the bytes to the call: two thread crossings per message instead of
four (transport, loop, pool, loop, transport).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from types import CoroutineType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from ._errors import StreamAbort
from ._invoke import TO_LOOP, CallbackPool, PoolJob, outside
from ._malformed import describe

logger = logging.getLogger(__name__)

#: Returned to the transport when the answer will come through the call instead.
PENDING = True

_INTERNAL = grpc.StatusCode.INTERNAL.value[0]


def _code(code: grpc.StatusCode) -> int:
    return int(code.value[0])


class NativeContext:
    """The part of `grpc.aio.ServicerContext` a callback may use, over a native call.

    calloutkit's contexts pass unknown attributes through to it, so ``invocation_metadata()``,
    ``peer()``, ``time_remaining()``, ``set_trailing_metadata()`` and
    ``send_initial_metadata()`` work on either transport. ``abort`` raises `StreamAbort`,
    which ends the call with that status.
    """

    __slots__ = ("_call",)

    def __init__(self, call: Any) -> None:
        self._call = call

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._call.invocation_metadata()  # type: ignore[no-any-return]

    def peer(self) -> str:
        return self._call.peer()  # type: ignore[no-any-return]

    def time_remaining(self) -> float | None:
        return self._call.time_remaining()  # type: ignore[no-any-return]

    def cancelled(self) -> bool:
        return False

    def auth_context(self) -> dict[str, list[bytes]]:
        # Made by the transport once per connection, in grpc's shape (mTLS: the client
        # certificate's subject, names and PEM), so `peer_identity` reads it alike.
        return self._call.auth_context()  # type: ignore[no-any-return]

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._call.set_trailing_metadata(metadata)

    async def send_initial_metadata(self, metadata: Any) -> None:
        # Sent with the first reply (or the status), which is when grpc.aio sends it too
        # unless the handler flushes it by hand.
        self._call.set_initial_metadata(metadata)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise StreamAbort(code, details)


def _fail(call: Any, error: BaseException) -> None:
    """End ``call`` for an answer that raised: its status when it aborted, else INTERNAL
    (the client never sees the exception's text; the log does)."""
    if isinstance(error, StreamAbort):
        call.finish(_code(error.code), error.details)
        return
    logger.error("callout failed", exc_info=error)
    call.finish(_INTERNAL, "internal error")


def _to_bytes(reply: Any) -> bytes | None:
    if reply is None or reply.__class__ is bytes:
        return reply  # type: ignore[no-any-return]
    return reply.SerializeToString()  # type: ignore[no-any-return]


async def _complete(call: Any, pending: Any) -> None:
    try:
        reply = await pending
        call.reply(_to_bytes(reply))
    except asyncio.CancelledError:
        pass  # the stream ended first; there is nobody to answer
    except Exception as error:
        _fail(call, error)


class _Driver:
    """Steps an answer's coroutine off the event loop, in whichever thread has it.

    The coroutine runs here until it yields (`runtime._invoke`): a `PoolJob` goes to the pool,
    whose thread sends the callback's result back in and goes on from there; `TO_LOOP` hands
    the coroutine to the loop, whose task resumes it (an ``async def`` callback, a ``def`` one
    that returned an awaitable, middleware). The transport thread no longer wakes the loop,
    nor the pool thread the loop again, for every message: straight at the server that took
    ``def`` callbacks from 7.6k to 24.8k one-message streams/s (``make bench
    BENCH_ARGS="--quick --only native-grpc-streams"``, before and after in one session), and
    through Envoy from 0.31-0.34x the grpc.aio floor's CPU per request, with the floor's p99,
    to 0.19x and 0.35x its p99 (``make bench BENCH_ARGS="--only native"``,
    docs/performance.md).
    """

    __slots__ = ("_call", "_coro", "_loop", "_pool")

    def __init__(self, call: Any, loop: asyncio.AbstractEventLoop,
                 pool: CallbackPool) -> None:
        self._call = call
        self._loop = loop
        self._pool = pool
        self._coro: Any = None

    def _drive(self, coro: Any) -> bytes | bool | None:
        """Step a new answer: its reply's bytes (or None) when it is done at once, else
        `PENDING`."""
        self._coro = coro
        return self._step(True, None)

    def _resume(self, ok: bool, value: Any) -> None:
        """A pool job's outcome: in the pool thread, or with `CallbackTimeout` on the loop."""
        out = self._step(ok, value)
        if out is not PENDING:
            self._done(out)  # type: ignore[arg-type]

    def _step(self, ok: bool, value: Any) -> bytes | bool | None:
        coro = self._coro
        outside.loop = True
        try:
            yielded = coro.send(value) if ok else coro.throw(value)
        except StopIteration as stop:
            try:
                return _to_bytes(stop.value)
            except Exception as error:
                self._failed(error)
                return PENDING
        except Exception as error:
            self._failed(error)
            return PENDING
        finally:
            outside.loop = False
        if yielded.__class__ is PoolJob:
            yielded.then = self._resume
            try:
                self._pool.run(self._loop, yielded)
            except Exception as error:  # the pool is shut down: the server is stopping
                coro.close()
                self._failed(error)
        elif yielded is TO_LOOP:
            self._to_loop(coro)
        else:  # only the loop's task can wait for this: a bug in calloutkit
            coro.close()
            self._failed(RuntimeError(f"an answer stepped off the loop awaited {yielded!r}"))
        return PENDING

    def _done(self, reply: bytes | None) -> None:
        self._call.reply(reply)

    def _failed(self, error: BaseException) -> None:
        _fail(self._call, error)

    def _to_loop(self, coro: Any) -> None:
        # The task takes the started coroutine as it is and resumes it where it stopped.
        self._loop.call_soon_threadsafe(self._run_on_loop, coro)

    def _run_on_loop(self, coro: Any) -> asyncio.Task[Any]:
        task = self._loop.create_task(coro)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return  # the stream ended first; there is nobody to answer
        raised = task.exception()
        if raised is not None:
            self._failed(raised)
            return
        try:
            reply = _to_bytes(task.result())
        except Exception as error:
            self._failed(error)
            return
        self._done(reply)


class _Stream(_Driver):
    """One bidi stream: the protocol's context and answer function, called per message."""

    __slots__ = ("_answer", "_context", "_ended", "_leave", "_off_loop", "_parse", "_task",
                 "_went_async")

    def __init__(self, call: Any, context: Any, answer: Callable[[Any, Any], Any],
                 parse: Callable[[bytes, Any], Any], leave: Callable[[], None] | None,
                 loop: asyncio.AbstractEventLoop, pool: CallbackPool, off_loop: bool) -> None:
        super().__init__(call, loop, pool)
        self._context = context
        self._answer = answer
        self._parse = parse
        self._leave = leave
        self._off_loop = off_loop
        self._task: asyncio.Task[Any] | None = None
        self._went_async = False
        self._ended = False

    def on_message(self, data: bytes) -> bytes | bool | None:
        try:
            reply = self._answer(self._parse(data, self._context), self._context)
            if reply.__class__ is CoroutineType:
                if self._off_loop:
                    return self._drive(reply)
                self._to_loop(reply)
                return PENDING
            return _to_bytes(reply)
        except Exception as error:
            _fail(self._call, error)
            return PENDING

    def _to_loop(self, coro: Any) -> None:
        self._went_async = True
        self._loop.call_soon_threadsafe(self._adopt, coro)

    def _adopt(self, coro: Any) -> None:
        if self._ended:  # the stream ended while the coroutine was on its way here
            coro.close()
            return
        self._task = self._run_on_loop(coro)

    def on_end(self) -> None:
        self._ended = True
        if self._leave is not None:
            self._leave()
        # Only a stream that ever handed work to the loop has anything there to cancel; the
        # callbacks run in order, so `_cancel` sees the task `_adopt` made. (An answer that
        # is in a pool thread finishes there, and its reply is dropped.)
        if self._went_async:
            self._loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()


def stream_opener(new_context: Callable[[Any], Any], answer: Callable[[Any, Any], Any],
                  parse: Callable[[bytes, Any], Any], enter: Callable[[], bool],
                  leave: Callable[[], None] | None, loop: asyncio.AbstractEventLoop,
                  pool: CallbackPool, off_loop: bool) -> Callable[[Any], _Stream | None]:
    """What the transport calls for each new stream: None refuses it (UNAVAILABLE).

    ``enter()`` counts the stream in, or says False to refuse it; ``leave()`` runs once when a
    stream it let in ends, however it ends. Both run on the transport thread. With
    ``off_loop`` the answers' coroutines are stepped off the loop (`_Driver`): only for a
    protocol whose coroutines await nothing but `Invoker` calls before `TO_LOOP`.
    """
    def open_stream(call: Any) -> _Stream | None:
        if not enter():
            return None
        try:
            return _Stream(call, new_context(NativeContext(call)), answer, parse, leave, loop,
                           pool, off_loop)
        except BaseException:
            if leave is not None:
                leave()
            raise

    return open_stream


def unary_handler(behavior: Callable[[Any, Any], Any], parse: Callable[[bytes], Any] | None,
                  loop: asyncio.AbstractEventLoop) -> Callable[[Any, bytes], bytes | bool]:
    """What the transport calls for each unary call: grpc's ``(request, context)`` handler."""
    def handle(call: Any, data: bytes) -> bytes | bool:
        try:
            reply = behavior(data if parse is None else parse(data), NativeContext(call))
            if reply.__class__ is CoroutineType:
                loop.call_soon_threadsafe(loop.create_task, _complete(call, reply))
                return PENDING
            out = _to_bytes(reply)
            if out is None:
                raise TypeError("a unary handler returned None")
            return out
        except Exception as error:
            _fail(call, error)
            return PENDING

    return handle


_UNKNOWN: int = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
_SERVING: int = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING


class NativeHealth:
    """grpc.health.v1 ``Check`` and ``Watch`` on the native transport, as grpcio's servicer
    answers them: ``Check`` of an unknown service is NOT_FOUND, ``Watch`` of one is
    SERVICE_UNKNOWN; ``Watch`` sends the status at once, then again each time it changes.

    ``healthy()`` is the truth for every known service; the server calls `changed` (on its
    loop) whenever that may have changed, and each watch sends its new status from there.
    """

    def __init__(self, names: list[str], healthy: Callable[[], bool],
                 malformed: Callable[[str], StreamAbort]) -> None:
        self._names = frozenset(names)
        self._healthy = healthy
        self._malformed = malformed
        self._watches: set[_Watch] = set()

    def _status(self, service: str) -> int:
        if service not in self._names:
            return _UNKNOWN
        return _SERVING if self._healthy() else _NOT_SERVING

    def _service(self, data: bytes, method: str) -> str:
        try:
            return str(health_pb2.HealthCheckRequest.FromString(data).service)
        except Exception as exc:
            raise self._malformed(f"/grpc.health.v1.Health/{method}: malformed request "
                                  f"({describe(exc)})") from None

    def check(self, data: bytes, context: Any) -> bytes:
        """``Check``, answered on the transport thread."""
        status = self._status(self._service(data, "Check"))
        if status == _UNKNOWN:
            raise StreamAbort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return bytes(health_pb2.HealthCheckResponse(status=status).SerializeToString())

    def watch(self, call: Any, data: bytes) -> _Watch | None:
        """``Watch``: what the transport calls when one opens."""
        try:
            service = self._service(data, "Watch")
        except StreamAbort as abort:
            call.finish(_code(abort.code), abort.details)
            return None
        watch = _Watch(call, service, self)
        self._watches.add(watch)  # first, so a change from here on is not missed
        watch.update()
        return watch

    def changed(self) -> None:
        for watch in list(self._watches):
            watch.update()


class _Watch:
    __slots__ = ("_call", "_health", "_last", "_lock", "_service")

    def __init__(self, call: Any, service: str, health: NativeHealth) -> None:
        self._call = call
        self._service = service
        self._health = health
        self._last: int | None = None
        # `update` runs on the transport thread (at the start) and on the loop (each change).
        self._lock = threading.Lock()

    def update(self) -> None:
        with self._lock:
            status = self._health._status(self._service)
            if status != self._last:
                self._last = status
                self._call.send(health_pb2.HealthCheckResponse(status=status)
                                .SerializeToString())

    def on_end(self) -> None:
        self._health._watches.discard(self)


class _Unary(_Driver):
    """One unary call whose answer is stepped off the loop."""

    __slots__ = ("_what",)

    def __init__(self, call: Any, loop: asyncio.AbstractEventLoop, pool: CallbackPool,
                 what: str) -> None:
        super().__init__(call, loop, pool)
        self._what = what

    def _done(self, reply: bytes | None) -> None:
        if reply is None:
            self._failed(TypeError("a unary handler returned None"))
            return
        self._call.reply(reply)

    def _failed(self, error: BaseException) -> None:
        if isinstance(error, StreamAbort):
            self._call.finish(_code(error.code), error.details)
            return
        # As `BaseServer._unary_handler` logs it on the loop.
        logger.error("%s failed", self._what, exc_info=error)
        self._call.finish(_INTERNAL, "internal error")


def unary_driver(answer: Callable[[bytes, Any], Any], refuse: Callable[[], bool],
                 loop: asyncio.AbstractEventLoop,
                 pool: CallbackPool) -> Callable[[Any, bytes], bytes | bool]:
    """What the transport calls for each unary call of a protocol's ``answer(bytes, context)``
    coroutine function, stepped off the loop (`_Driver`); refused while draining."""
    what = getattr(answer, "__qualname__", "a unary call")

    def handle(call: Any, data: bytes) -> bytes | bool:
        unary = _Unary(call, loop, pool, what)
        if refuse():
            unary._failed(StreamAbort(grpc.StatusCode.UNAVAILABLE, "server is draining"))
            return PENDING
        try:
            coro = answer(data, NativeContext(call))
        except Exception as error:
            unary._failed(error)
            return PENDING
        out = unary._drive(coro)
        if out is None:
            unary._done(None)
            return PENDING
        return out

    return handle
