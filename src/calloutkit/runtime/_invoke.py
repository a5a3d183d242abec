"""How a user callback is called: awaited, inline on the event loop, or in a thread.

`Invoker` decides once, when the server is built, which of the three a callback gets.
`CallbackPool` is the thread pool for plain ``def`` callbacks. It does what
``loop.run_in_executor`` does for this one case at about half the CPU per call (measured in
``bench/``): one queue hand-off into the pool, and one loop wake-up for a whole batch of
results coming back instead of one per result. With ``callback_timeout`` it also keeps a
callback that never returns from taking a thread for good (see `CallbackPool`).

The native transport drives an answer's coroutine itself, off the loop (runtime._native):
there a pool callback's `Invoker` yields a `PoolJob` instead of awaiting a loop future, and
anything that needs the loop yields `TO_LOOP` first, so that the loop is not involved at all
in a ``def`` callback's answer.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import inspect
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

from . import _logging
from ._errors import CallbackTimeout

logger = logging.getLogger(__name__)

T = TypeVar("T")

_INLINE_ATTR = "__calloutkit_nonblocking__"

_ASYNC, _INLINE, _POOL = 0, 1, 2


class _Outside(threading.local):
    """``loop`` is True while runtime._native steps an answer's coroutine itself, in this
    thread, off the event loop: an `Invoker` then yields `PoolJob` / `TO_LOOP`."""

    loop = False


outside = _Outside()


class PoolJob:
    """A ``def`` callback's call, yielded to whoever steps the coroutine off the loop.

    That driver hands it to `CallbackPool.run` with ``then``, which the pool calls with
    ``(ok, result)`` in the pool thread once the callback returned; awaiting the job gives the
    result (or raises it) when the driver sends it back in.
    """

    __slots__ = ("args", "func", "then")

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.func = func
        self.args = args
        self.then: Callable[[bool, Any], None] | None = None

    def __await__(self) -> Generator[Any, Any, Any]:
        return (yield self)


class _ToLoop:
    """Yielded off the loop before anything that needs the event loop (an ``async def``
    callback, an awaitable a ``def`` returned): the driver moves the coroutine to the loop,
    whose task resumes it right after this point."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        yield self


TO_LOOP = _ToLoop()


async def on_loop(pending: Awaitable[T]) -> T:
    """Await ``pending`` on the event loop, moving there first when stepped off it."""
    if outside.loop:
        await TO_LOOP
    return await pending


def nonblocking(func: Callable[..., T]) -> Callable[..., T]:
    """Mark a synchronous callback as fast and non-blocking, so it runs inline on the event loop.

    By default a ``def`` callback runs in the server's thread pool so that a blocking call in it
    cannot stall other streams. A callback that only builds a reply skips that hop::

        class Server(CalloutServer):
            @nonblocking
            def on_request_headers(self, headers, context):
                return add_header_mutation(add=[("x-seen", "1")])
    """
    setattr(func, _INLINE_ATTR, True)
    return func


class _Thread:
    """One pool thread, as the watchdog sees it: the call it runs and since when."""

    __slots__ = ("call", "started", "stuck")

    def __init__(self) -> None:
        self.call: tuple[Any, ...] | None = None
        self.started = 0.0
        self.stuck = False  # set (under the pool's lock) once its call ran past the deadline


def _callback_name(func: Callable[..., Any]) -> str:
    owner = getattr(func, "__self__", None)
    name = getattr(func, "__name__", None) or repr(func)
    if owner is not None and not isinstance(owner, type):
        return f"{type(owner).__name__}.{name}"
    return str(getattr(func, "__qualname__", name))


class CallbackPool:
    """Threads that run blocking callbacks for one event loop.

    Threads start on demand up to ``size`` and are daemons, so a callback stuck past the grace
    period cannot keep the process from exiting.

    With a ``timeout``, a call still running when it is over is answered with `CallbackTimeout`
    (the caller's error policy takes it from there) and its thread stops counting: another
    starts in its place, so a callback that blocks for ever costs one thread, not the pool.
    At most ``size`` stuck threads are replaced (``2 * size`` threads in all). While every one
    of them is stuck, calls fail at once rather than wait for a thread that may never come,
    and ``on_exhausted(True)`` has been called; ``on_exhausted(False)`` follows once one of
    them returns. A stuck thread that returns ends: its place was taken.

    A watchdog on the loop checks the running calls a few times a second, and only while
    there are calls in flight, so a call costs no timer of its own.
    """

    #: Give every call a copy of the caller's context (contextvars), not only calls made
    #: while a stream's log ids are set: tracing turns it on, so that the span a ``def``
    #: callback runs in is the current one in its thread too.
    carry_context = False

    def __init__(self, size: int, name: str = "calloutkit-callback", *,
                 timeout: float | None = None,
                 on_exhausted: Callable[[bool], None] | None = None) -> None:
        self._size = size
        self._limit = 2 * size  # threads alive at once, stuck ones included
        self._name = name
        self._timeout = timeout or None
        self._tick = min(0.25, self._timeout / 5) if self._timeout else 0.0
        self._on_exhausted = on_exhausted
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        # Calls not yet answered, the threads serving the queue, how many threads are stuck,
        # whether the watchdog runs: written under the lock, since `run` may come from any
        # thread (`submit` comes from the loop's).
        self._in_flight = 0
        self._threads: list[_Thread] = []
        self._stuck = 0
        self._started = 0
        self._exhausted = False
        self._watching = False
        self._watchdog: asyncio.TimerHandle | None = None  # on the loop's thread only
        self._lock = threading.Lock()
        self._done: collections.deque[tuple[Any, bool, Any, _Thread]] = collections.deque()
        self._wake_pending = False
        self._closed = False

    @property
    def stuck(self) -> int:
        """Threads running a call past its deadline right now."""
        return self._stuck

    @property
    def busy(self) -> int:
        """Threads running a call right now (stuck ones not included)."""
        return sum(1 for thread in list(self._threads) if thread.call is not None)

    @property
    def size(self) -> int:
        """Threads the pool runs at most, stuck ones not counted."""
        return self._size

    @property
    def exhausted(self) -> bool:
        """True while every thread the pool may start is stuck: no callback can run."""
        return self._exhausted

    def submit(self, loop: asyncio.AbstractEventLoop, func: Callable[..., Any],
               *args: Any) -> asyncio.Future[Any]:
        """Run ``func(*args)`` in a pool thread; the returned future resolves on ``loop``.

        Call it on ``loop``'s thread."""
        if self._closed:
            raise RuntimeError("callback pool is shut down")
        future = loop.create_future()
        if self._exhausted:
            future.set_exception(self._no_thread(func))
            return future
        with self._lock:
            self._in_flight += 1
            if self._in_flight > len(self._threads):
                self._grow()
            if not self._watching and self._timeout is not None:
                self._watching = True
                self._watchdog = loop.call_later(self._tick, self._watch, loop)
        # A stream's log ids (runtime._logging), and its span, follow its callback into the
        # thread.
        context = (contextvars.copy_context()
                   if self.carry_context or _logging.current.get() is not None else None)
        self._jobs.put((loop, future, func, args, context))
        return future

    def run(self, loop: asyncio.AbstractEventLoop, job: PoolJob) -> None:
        """Run ``job`` in a pool thread, from any thread: ``job.then(ok, result)`` is called
        in that thread once its callback returned (in the callback's context), or on
        ``loop`` with `CallbackTimeout` by the watchdog, or here at once when no thread can
        run it. Exactly one of them calls it."""
        assert job.then is not None
        if self._closed:
            raise RuntimeError("callback pool is shut down")
        if self._exhausted:
            job.then(False, self._no_thread(job.func))
            return
        with self._lock:
            self._in_flight += 1
            if self._in_flight > len(self._threads):
                self._grow()
            arm = not self._watching and self._timeout is not None
            if arm:
                self._watching = True
        if arm:  # the first call after an idle spell: the watchdog's timer lives on the loop
            loop.call_soon_threadsafe(self._arm, loop)
        context = (contextvars.copy_context()
                   if self.carry_context or _logging.current.get() is not None else None)
        self._jobs.put((loop, job, job.func, job.args, context))

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._watchdog is None and not self._closed:
            self._watchdog = loop.call_later(self._tick, self._watch, loop)

    def _grow(self) -> None:
        """Start a thread when there is room for one (the lock held)."""
        live = len(self._threads)
        if self._closed or live >= self._size or live + self._stuck >= self._limit:
            return
        self._started += 1
        me = _Thread()
        self._threads.append(me)
        threading.Thread(target=self._work, args=(me,), name=f"{self._name}-{self._started}",
                         daemon=True).start()

    def _work(self, me: _Thread) -> None:
        lock = self._lock
        while (call := self._jobs.get()) is not None:
            loop, future, func, args, context = call
            # No lock: ``started`` is written first, so whoever sees this call sees its start.
            me.started = time.monotonic()
            me.call = call
            try:
                result = func(*args) if context is None else context.run(func, *args)
                ok = True
            except BaseException as exc:  # handed to the awaiting coroutine
                result, ok = exc, False
            direct = future.__class__ is PoolJob
            with lock:
                me.call = None
                stuck = me.stuck
                if not stuck:
                    self._in_flight -= 1
                answer_here = direct and not stuck
                if answer_here:
                    wake = False
                else:
                    self._done.append((future, ok, result, me))
                    wake, self._wake_pending = not self._wake_pending, True
            if wake:
                try:
                    loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    return
            elif answer_here:
                # The job's own answer goes on from here, in this thread (runtime._native).
                try:
                    if context is None:
                        future.then(ok, result)
                    else:
                        context.run(future.then, ok, result)
                except BaseException:  # the driver answers its call itself; never expected
                    logger.exception("continuing a callback's answer failed")
            if stuck:
                return  # another thread took this one's place when it got stuck

    def _deliver(self) -> None:
        with self._lock:
            done, self._done = self._done, collections.deque()
            self._wake_pending = False
        recovered = 0
        for future, ok, result, thread in done:
            if thread.stuck:  # answered at its deadline already
                recovered += 1
                continue
            if future.done():  # the awaiting stream was cancelled
                continue
            if ok:
                future.set_result(result)
            else:
                future.set_exception(result)
        if recovered:
            with self._lock:
                self._stuck -= recovered
            logger.info("%d stuck callback(s) returned after their deadline; results dropped",
                        recovered)
            self._grow_to_demand()
            self._check_exhausted()

    def _grow_to_demand(self) -> None:
        with self._lock:
            while self._in_flight > len(self._threads):
                before = len(self._threads)
                self._grow()
                if len(self._threads) == before:
                    return

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Answer the calls running past the deadline and replace their threads."""
        self._watchdog = None
        assert self._timeout is not None
        now = time.monotonic()
        for me in list(self._threads):
            call = me.call
            if call is None or now - me.started < self._timeout:
                continue
            with self._lock:
                if me.call is not call:  # it returned meanwhile
                    continue
                me.stuck = True
                self._threads.remove(me)
                self._stuck += 1
                self._in_flight -= 1
            _, future, func, _, context = call
            name = _callback_name(func)
            self._fail(future, context, CallbackTimeout(
                f"callback {name} ran past callback_timeout ({self._timeout:g}s)"))
            logger.warning("callback %s still running after callback_timeout (%gs): its "
                           "stream gets the error policy's reply and another thread takes "
                           "its place (%d stuck, at most %d threads in all)", name,
                           self._timeout, self._stuck, self._limit)
        self._grow_to_demand()
        self._check_exhausted()
        with self._lock:
            self._watching = self._in_flight > 0 and not self._closed
        if self._watching:
            self._watchdog = loop.call_later(self._tick, self._watch, loop)

    @staticmethod
    def _fail(future: Any, context: contextvars.Context | None, error: BaseException) -> None:
        """Answer a call that will not run (or not in time) with ``error``, on the loop."""
        if future.__class__ is PoolJob:
            then = future.then
            assert then is not None
            # Its context may still be entered by the stuck thread: a copy of it, then.
            if context is None:
                then(False, error)
            else:
                context.copy().run(then, False, error)
        elif not future.done():
            future.set_exception(error)

    def _no_thread(self, func: Callable[..., Any]) -> CallbackTimeout:
        return CallbackTimeout(f"no thread can run callback {_callback_name(func)}: all "
                               f"{self._limit} are stuck past callback_timeout")

    def _check_exhausted(self) -> None:
        exhausted = self._stuck >= self._limit
        if exhausted == self._exhausted:
            return
        self._exhausted = exhausted
        if exhausted:
            logger.error("all %d callback threads are stuck past callback_timeout: def "
                         "callbacks fail at once until one of them returns", self._limit)
            # No thread is left to take what waits in the queue: answer it now.
            while True:
                try:
                    call = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if call is None:
                    continue
                with self._lock:
                    self._in_flight -= 1
                _, future, func, _, context = call
                self._fail(future, context, self._no_thread(func))
        else:
            logger.warning("a stuck callback returned: def callbacks run again (%d still "
                           "stuck)", self._stuck)
        if self._on_exhausted is not None:
            self._on_exhausted(exhausted)

    def shutdown(self) -> None:
        """Stop the threads once they finish what they are running; do not wait for them."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for _ in list(self._threads):
            self._jobs.put(None)


class Invoker:
    """Calls one user callback the right way: awaited, inline, or in the thread pool.

    The decision is made once, when the server is built, not per message. ``is_async`` and
    ``is_inline`` let a hot path call ``func`` itself and skip this object's own coroutine.
    """

    __slots__ = ("_kind", "_pool", "func", "is_async", "is_inline")

    def __init__(self, pool: CallbackPool, func: Callable[..., Any]) -> None:
        self._pool = pool
        self.func = func
        if inspect.iscoroutinefunction(func):
            self._kind = _ASYNC
        elif getattr(func, _INLINE_ATTR, False):
            self._kind = _INLINE
        else:
            self._kind = _POOL
        self.is_async = self._kind == _ASYNC
        self.is_inline = self._kind == _INLINE

    async def __call__(self, *args: Any) -> Any:
        kind = self._kind
        if kind == _ASYNC:
            if outside.loop:
                await TO_LOOP
            return await self.func(*args)
        if kind == _INLINE:
            result = self.func(*args)
        elif outside.loop:
            # Stepped off the loop by the native transport: the callback goes straight to a
            # pool thread, which goes on with this coroutine when it returns (runtime._native).
            result = await PoolJob(self.func, args)
        else:
            result = await self._pool.submit(asyncio.get_running_loop(), self.func, *args)
        if inspect.isawaitable(result):  # a def returning a coroutine still gets awaited
            if outside.loop:
                await TO_LOOP
            return await result
        return result
