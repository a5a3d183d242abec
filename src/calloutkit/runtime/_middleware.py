"""Middleware: code of your own around every callback of every protocol.

A middleware is ``def mw(call, proceed)`` or ``async def mw(call, proceed)``. ``call`` is a
`CallInfo` (protocol, phase, callback name, message, context); ``proceed()`` runs the next
middleware, or the callback after the last one, and gives what it returned. What the
middleware returns is what the protocol treats as the callback's answer, so returning without
calling ``proceed()`` answers in the callback's place, and an exception goes to the server's
error policy as one from the callback would.

Where each one runs:

- ``async def``: on the event loop; ``await proceed()``.
- ``def``: in a thread of the callback pool, as a ``def`` callback does (it may block), and
  everything inside it runs in that thread too: ``proceed()`` calls the next ``def``
  middleware or ``def`` callback right there and returns its result; an ``async def`` one
  inside it runs on the loop while the thread waits. Put ``async def`` middleware first: a
  ``def`` one outside it costs a thread per call for the whole time.

`chain` builds the wrapped callback once, when the server is built; a server without
middleware never calls it, so its callbacks are called exactly as before.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ._invoke import _INLINE_ATTR, CallbackPool

Middleware = Callable[["CallInfo", Callable[[], Any]], Any]


class CallInfo:
    """What a middleware learns about the callback call it wraps.

    - ``protocol``: ``"ext_proc"`` (L7), ``"network_ext_proc"`` (L4), ``"ext_authz"`` or
      ``"tyk"``.
    - ``phase``: the message's phase: ``"request_headers"``, ``"response_body"``, ...
      (L7; ``"process"`` for a `process` override), ``"read_data"``, ``"write_data"``,
      ``"should_close_connection"`` (L4), ``"check"`` (ext_authz), the hook (``"pre"``,
      ``"post"``, ``"post_key_auth"``, ``"custom_key_check"``, ``"response"``) or
      ``"event"`` (Tyk).
    - ``callback``: the callback's name (``"on_request_headers"``, a Tyk plugin's name).
    - ``message``: the callback's first argument (headers, body, data chunk, the
      `AuthzRequest`, the Tyk ``Object``, the event).
    - ``context``: the stream's or call's context (`CalloutContext`, `NetworkContext`,
      `AuthzContext`, the Tyk `PluginCall`); None for a Tyk event.
    - ``args``: every argument the callback gets, in order.
    """

    __slots__ = ("args", "callback", "context", "message", "phase", "protocol")

    def __init__(self, protocol: str, phase: str, callback: str, message: Any, context: Any,
                 args: tuple[Any, ...]) -> None:
        self.protocol = protocol
        self.phase = phase
        self.callback = callback
        self.message = message
        self.context = context
        self.args = args

    def __repr__(self) -> str:
        return f"CallInfo({self.protocol} {self.phase} {self.callback})"


# How a protocol tells a call's CallInfo from the callback's arguments.
Describe = Callable[[tuple[Any, ...]], CallInfo]


def describer(protocol: str, phase: str, callback: str) -> Describe:
    """The usual shape: the message first, the context last (absent for one argument)."""

    def describe(args: tuple[Any, ...]) -> CallInfo:
        return CallInfo(protocol, phase, callback, args[0] if args else None,
                        args[-1] if len(args) > 1 else None, args)

    return describe


def check_middleware(middleware: Sequence[Any] | None) -> tuple[Middleware, ...]:
    """The ``middleware`` option as a tuple of callables; `ConfigError` names a bad entry."""
    from ._errors import ConfigError

    if middleware is None:
        return ()
    if isinstance(middleware, str | bytes) or not isinstance(middleware, Sequence):
        raise ConfigError(f"middleware must be a list of callables, got "
                          f"{type(middleware).__name__}")
    for entry in middleware:
        if not callable(entry):
            raise ConfigError(f"middleware: {entry!r} is not callable")
    return tuple(middleware)


def chain(pool: CallbackPool, func: Callable[..., Any], middleware: Sequence[Middleware],
          describe: Describe) -> Callable[..., Awaitable[Any]]:
    """``func`` wrapped in ``middleware`` (the first outermost), as one ``async def``."""
    is_async = [inspect.iscoroutinefunction(mw) for mw in middleware]
    func_async = inspect.iscoroutinefunction(func)
    func_inline = bool(getattr(func, _INLINE_ATTR, False))
    last = len(middleware)

    async def on_loop(index: int, call: CallInfo) -> Any:
        """The chain from ``index`` inward, run on the loop."""
        if index == last:
            if func_async:
                return await func(*call.args)
            if func_inline:
                result = func(*call.args)
            else:
                result = await pool.submit(asyncio.get_running_loop(), func, *call.args)
            if inspect.isawaitable(result):
                return await result
            return result
        mw = middleware[index]
        if is_async[index]:
            return await mw(call, lambda: on_loop(index + 1, call))
        loop = asyncio.get_running_loop()
        return await pool.submit(loop, in_thread, index, call, loop)

    def in_thread(index: int, call: CallInfo, loop: asyncio.AbstractEventLoop) -> Any:
        """The chain from ``index`` inward, run in the pool thread a ``def`` middleware has."""
        if index == last:
            if func_async:
                return asyncio.run_coroutine_threadsafe(func(*call.args), loop).result()
            result = func(*call.args)
        elif is_async[index]:
            result = asyncio.run_coroutine_threadsafe(on_loop(index, call), loop).result()
        else:
            result = middleware[index](call, lambda: in_thread(index + 1, call, loop))
        if inspect.isawaitable(result):
            async def wait() -> Any:
                return await result

            return asyncio.run_coroutine_threadsafe(wait(), loop).result()
        return result

    async def wrapped(*args: Any) -> Any:
        return await on_loop(0, describe(args))

    wrapped.__name__ = getattr(func, "__name__", "callback")
    wrapped.__qualname__ = getattr(func, "__qualname__", wrapped.__name__)
    return wrapped
