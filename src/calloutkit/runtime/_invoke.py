"""How a user callback is called: awaited, inline on the event loop, or in a thread.

`Invoker` decides once, when the server is built, which of the three a callback gets.
`CallbackPool` is the thread pool for plain ``def`` callbacks. It does what
``loop.run_in_executor`` does for this one case at about half the CPU per call (measured in
``bench/``): one queue hand-off into the pool, and one loop wake-up for a whole batch of
results coming back instead of one per result.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import inspect
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from . import _logging

T = TypeVar("T")

_INLINE_ATTR = "__calloutkit_nonblocking__"

_ASYNC, _INLINE, _POOL = 0, 1, 2


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


class CallbackPool:
    """Threads that run blocking callbacks for one event loop.

    Threads start on demand up to ``size`` and are daemons, so a callback stuck past the grace
    period cannot keep the process from exiting.
    """

    def __init__(self, size: int, name: str = "calloutkit-callback") -> None:
        self._size = size
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._in_flight = 0  # touched on the loop's thread only
        self._lock = threading.Lock()
        self._done: collections.deque[tuple[asyncio.Future[Any], bool, Any]] = (
            collections.deque())
        self._wake_pending = False
        self._closed = False

    def submit(self, loop: asyncio.AbstractEventLoop, func: Callable[..., Any],
               *args: Any) -> asyncio.Future[Any]:
        """Run ``func(*args)`` in a pool thread; the returned future resolves on ``loop``."""
        if self._closed:
            raise RuntimeError("callback pool is shut down")
        future = loop.create_future()
        self._in_flight += 1
        if self._in_flight > len(self._threads) and len(self._threads) < self._size:
            thread = threading.Thread(target=self._work, name=f"{self._name}-{len(self._threads)}",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()
        if _logging.current.get() is not None:  # a stream's log ids follow it into the thread
            func, args = contextvars.copy_context().run, (func, *args)
        self._jobs.put((loop, future, func, args))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, func, args = job
            try:
                result, ok = func(*args), True
            except BaseException as exc:  # handed to the awaiting coroutine
                result, ok = exc, False
            with self._lock:
                self._done.append((future, ok, result))
                wake, self._wake_pending = not self._wake_pending, True
            if wake:
                try:
                    loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    return

    def _deliver(self) -> None:
        with self._lock:
            done, self._done = self._done, collections.deque()
            self._wake_pending = False
        self._in_flight -= len(done)
        for future, ok, result in done:
            if future.done():  # the awaiting stream was cancelled
                continue
            if ok:
                future.set_result(result)
            else:
                future.set_exception(result)

    def shutdown(self) -> None:
        """Stop the threads once they finish what they are running; do not wait for them."""
        self._closed = True
        for _ in self._threads:
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
            return await self.func(*args)
        if kind == _INLINE:
            result = self.func(*args)
        else:
            result = await self._pool.submit(asyncio.get_running_loop(), self.func, *args)
        if inspect.isawaitable(result):  # a def returning a coroutine still gets awaited
            return await result
        return result
