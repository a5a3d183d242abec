"""Malformed requests: what every server kind answers to bytes it cannot parse.

Every method is registered without a request deserializer, so a request reaches calloutkit's
own code as bytes and is parsed there, where grpc would have parsed it anyway (the same one
``FromString`` call per message). A deserializer that raises does so inside grpc, which sends
the exception's text to the peer as UNKNOWN and logs a traceback per message; parsed here,
any exception from decoding (protobuf's DecodeError, a RecursionError from deeply nested
JSON, anything else) is the peer's error: the call ends with INVALID_ARGUMENT and a fixed
text, and the server logs one line, at most once per interval, with how many it kept quiet.

`MalformedInput` is that answer and that log line for one server kind (`RateLimitedLog` the
line alone, for a request that parses but makes no sense); `parse_requests`
wraps a method handler that has a deserializer (gRPC health, reflection) so it gets the same.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from ._errors import StreamAbort

_INTERVAL = 60.0  # seconds between two log lines about malformed requests, per server kind
_PREVIEW = 200


def describe(exc: BaseException) -> str:
    """One short line saying why decoding failed, for the server's log (never for the peer)."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= _PREVIEW else text[:_PREVIEW] + "..."


class RateLimitedLog:
    """A log line about bad input: the first, then at most one per ``interval`` seconds,
    saying how many went unlogged in between, so a peer sending garbage cannot flood the
    log. Also for a request that parses but makes no sense and is answered all the same."""

    __slots__ = ("_interval", "_level", "_logger", "_next", "_quiet")

    def __init__(self, logger: logging.Logger, level: int = logging.ERROR,
                 interval: float = _INTERVAL) -> None:
        self._logger = logger
        self._level = level
        self._interval = interval
        self._next = 0.0
        self._quiet = 0

    def __call__(self, problem: str) -> None:
        now = time.monotonic()
        if now < self._next:
            self._quiet += 1
            return
        self._next = now + self._interval
        if self._quiet:
            self._logger.log(self._level, "%s (and %d more like it since the last line)",
                             problem, self._quiet)
        else:
            self._logger.log(self._level, "%s", problem)
        self._quiet = 0


class MalformedInput:
    """One server kind's answer to a request it cannot parse.

    Calling it with what is wrong logs that at ERROR (a `RateLimitedLog`) and returns the
    `StreamAbort` to raise: INVALID_ARGUMENT with ``details``, the same text whatever went
    wrong.
    """

    __slots__ = ("_log", "details")

    def __init__(self, logger: logging.Logger, details: str,
                 interval: float = _INTERVAL) -> None:
        self._log = RateLimitedLog(logger, logging.ERROR, interval)
        self.details = details

    def __call__(self, problem: str) -> StreamAbort:
        self._log(problem)
        return StreamAbort(grpc.StatusCode.INVALID_ARGUMENT, self.details)


def parse_requests(handler: grpc.RpcMethodHandler, name: str,
                   logger: logging.Logger) -> grpc.RpcMethodHandler:
    """``handler`` with its request deserializer called here rather than by grpc.

    A request that does not parse ends the call with INVALID_ARGUMENT (see `MalformedInput`);
    the behaviour and the response serializer are the handler's own. ``name`` (the method's
    full name) is for the log line.
    """
    parse = handler.request_deserializer
    if parse is None:
        return handler
    malformed = MalformedInput(logger, "malformed request")

    def decode(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:
            raise malformed(f"{name}: malformed request ({describe(exc)})") from None

    async def requests(stream: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for data in stream:
            yield decode(data)

    if handler.request_streaming:
        behaviour: Callable[..., Any] = (handler.stream_stream if handler.response_streaming
                                         else handler.stream_unary)
        adapt: Callable[[Any], Any] = requests
    else:
        behaviour = handler.unary_stream if handler.response_streaming else handler.unary_unary
        adapt = decode

    if inspect.isasyncgenfunction(behaviour):
        async def serve_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for reply in behaviour(adapt(request), context):
                    yield reply
            except StreamAbort as abort:
                await context.abort(abort.code, abort.details)
        wrapped: Callable[..., Any] = serve_stream
    elif inspect.iscoroutinefunction(behaviour):
        async def serve(request: Any, context: Any) -> Any:
            try:
                return await behaviour(adapt(request), context)
            except StreamAbort as abort:
                await context.abort(abort.code, abort.details)
        wrapped = serve
    else:
        return handler  # a synchronous servicer: grpc.aio runs it in its executor, as given

    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[
        (bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(wrapped, response_serializer=handler.response_serializer)  # type: ignore[no-any-return]
