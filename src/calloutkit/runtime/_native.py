"""The Python side of the native transport (``transport="native"``).

The transport (`calloutkit_native`, Rust: the calloutkit-native distribution) runs HTTP/2 on
one thread of its own and calls Python once per message, with the GIL taken for that call
only. What it calls is built here from the same method table grpc.aio serves:

- a bidi ``Process`` method made by `BaseServer._stream_function`: per stream, an object whose
  ``on_message(bytes)`` runs the protocol's answer function and returns the reply's bytes,
  None, or `PENDING`; ``on_end()`` runs when the stream ends, however it ends;
- a unary method taking and returning bytes (Tyk, ext_authz, gRPC health ``Check``):
  ``handler(call, bytes)`` returning the reply's bytes or `PENDING`.

`PENDING` means the answer is a coroutine: it runs on the server's event loop, and its
result goes back to the transport through the call (`Call.reply` / `Call.finish`, safe from
any thread). So ``@nonblocking`` callbacks run inline on the transport thread, ``async def``
ones on the loop, and ``def`` ones in the runtime's pool, reached from the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import CoroutineType
from typing import Any

import grpc

from ._errors import StreamAbort

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
        # No client certificates on the native transport yet: nothing to authenticate by.
        return {}

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


class _Stream:
    """One bidi stream: the protocol's context and answer function, called per message."""

    __slots__ = ("_answer", "_call", "_context", "_loop", "_parse", "_task", "_went_async")

    def __init__(self, call: Any, context: Any, answer: Callable[[Any, Any], Any],
                 parse: Callable[[bytes], Any], loop: asyncio.AbstractEventLoop) -> None:
        self._call = call
        self._context = context
        self._answer = answer
        self._parse = parse
        self._loop = loop
        self._task: asyncio.Task[None] | None = None
        self._went_async = False

    def on_message(self, data: bytes) -> bytes | bool | None:
        try:
            reply = self._answer(self._parse(data), self._context)
            if reply.__class__ is CoroutineType:
                self._went_async = True
                self._loop.call_soon_threadsafe(self._start, reply)
                return PENDING
            return _to_bytes(reply)
        except Exception as error:
            _fail(self._call, error)
            return PENDING

    def _start(self, pending: Any) -> None:
        self._task = self._loop.create_task(_complete(self._call, pending))
        # A task cancelled before its first step never starts the answer's coroutine; close
        # it then, or Python warns of a coroutine never awaited. (Once it ran, this is a no-op.)
        self._task.add_done_callback(lambda _: pending.close())

    def on_end(self) -> None:
        # Only a stream that ever handed work to the loop has anything there to cancel; the
        # callbacks run in order, so `_cancel` sees the task `_start` made.
        if self._went_async:
            self._loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()


def stream_opener(new_context: Callable[[Any], Any], answer: Callable[[Any, Any], Any],
                  parse: Callable[[bytes], Any], refuse: Callable[[], bool],
                  loop: asyncio.AbstractEventLoop) -> Callable[[Any], _Stream | None]:
    """What the transport calls for each new stream: None refuses it (UNAVAILABLE)."""
    def open_stream(call: Any) -> _Stream | None:
        if refuse():
            return None
        return _Stream(call, new_context(NativeContext(call)), answer, parse, loop)

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
