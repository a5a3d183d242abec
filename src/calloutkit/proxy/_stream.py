"""Proxy one call: `handle_stream` (any call kind, as a bidi stream) and `handle_unary`.

Frames are raw bytes both ways (no serializers), so any service and any payload passes,
protobuf or not. For one call on the stream path:

- the handler's own task reads the primary and writes to the client, so a client cancel
  reaches it as ``CancelledError`` (grpcio shows it to a pending ``read()`` as a mere
  half-close) and every backend leg is cancelled;
- a pump task reads the client and writes to each secondary's queue and to the primary, then
  half-closes them;
- a header task forwards the primary's response headers the moment they arrive, before any
  message and also when the primary then fails.

The proxy's own statuses (it could not open a leg, reach a destination, read the client, or
a finalizer or ``err_handler`` raised) say what failed in a fixed text; the addresses and
exception text behind it go to the log, and to the client only with ``expose_errors``. A
backend's status is never rewritten.

The outcome, in order of precedence: an error reading the client (INTERNAL "failed proxying
c2s"); the primary's error after its ``err_handler`` (code, details and trailers unchanged);
in wait mode, a secondary's error its handler did not swallow (INTERNAL "failed proxying to
secondary"); the finalizer's error. The finalizer runs once in every case (a director error
never gets this far).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Sequence
from typing import Any, TypeAlias

import grpc

from ._callstatus import FinalStatus, StatusWatch
from ._channels import ChannelPool
from ._director import (
    Destination,
    MirrorPolicy,
    Overflow,
    ProxyError,
    StreamParameters,
    status_of,
)
from ._metadata import MetadataValue, forwardable
from ._mirror import Leg, call_err_handler, error_code, finish, task_cancelled
from ._peeker import Peeker

logger = logging.getLogger(__name__)

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
_EOF = grpc.aio.EOF
_CALL_ENDED = (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError)
_SKIPPED = "mirror skipped: {n} mirrored calls already in flight (MirrorPolicy.max_in_flight)"


class _Status:
    """The status the client will get."""

    __slots__ = ("code", "details")

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details

    @classmethod
    def of(cls, error: BaseException, expose: bool = False) -> _Status:
        if isinstance(error, ProxyError):
            return cls(error.code, error.details)
        if isinstance(error, grpc.RpcError):
            code, details = error.code(), error.details()
            if isinstance(code, grpc.StatusCode):
                return cls(code, details or "")
        # Not a status anyone chose: an exception's text is for the log, not the client.
        detail = str(error) or type(error).__name__
        logger.warning("proxy error: %s", detail)
        return cls(grpc.StatusCode.INTERNAL, detail if expose else "proxy error")

    @classmethod
    def wrapped(cls, prefix: str, error: BaseException, expose: bool = False) -> _Status:
        inner = cls.of(error, expose)
        if not expose:  # a secondary's details may be a transport error naming its address
            logger.warning("%s: %s: %s", prefix, inner.code.name, inner.details)
            return cls(grpc.StatusCode.INTERNAL, f"{prefix}: {inner.code.name}")
        return cls(grpc.StatusCode.INTERNAL, f"{prefix}: {inner.code.name}: {inner.details}")

    @classmethod
    def own(cls, code: grpc.StatusCode, public: str, detail: str, expose: bool) -> _Status:
        """A status of the proxy's own: ``detail`` logged, and sent only with ``expose``."""
        logger.warning("%s", detail)
        return cls(code, detail if expose else public)


async def _connected(channel: grpc.aio.Channel, timeout: float | None) -> bool:
    """Whether ``channel`` connects (a call on it would not fail fast) within ``timeout``."""
    connectivity = grpc.ChannelConnectivity
    state = channel.get_state(try_to_connect=True)
    try:
        async with asyncio.timeout(timeout):
            while state in (connectivity.IDLE, connectivity.CONNECTING):
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)
    except TimeoutError:
        return False
    return state is connectivity.READY


def _timeout(context: Context, limit: float | None) -> float | None:
    # Deadlines are not inherited across grpcio calls: copy what is left of the client's.
    remaining: float | None = context.time_remaining()
    if remaining is None:
        return limit
    return remaining if limit is None else min(remaining, limit)


async def run_finalizer(params: StreamParameters, expose: bool = False) -> BaseException | None:
    """Run ``params.req_finalizer`` once; the error it raised, if any."""
    finalizer = params.req_finalizer
    if finalizer is None:
        return None
    try:
        result = finalizer()
        if inspect.isawaitable(result):
            await result
    except Exception as exc:
        status = status_of(exc)
        if status is not None:  # its code and details; an AioRpcError's text is a repr
            return status
        logger.exception("request finalizer failed")
        return ProxyError(grpc.StatusCode.INTERNAL, f"request finalizer failed: {exc}" if expose
                          else "request finalizer failed")
    return None


class _Proxy:
    """What one proxied call shares between its steps, on either path."""

    def __init__(self, context: Context, method: str, params: StreamParameters,
                 channels: ChannelPool | None, expose: bool = False) -> None:
        self.context = context
        self.expose = expose
        self.method = method
        self.params = params
        self.channels = channels
        self.policy = params.mirror if params.mirror is not None else MirrorPolicy()
        self.wait = params.wait_for_secondaries
        self.overflow = Overflow(params.secondary_overflow)
        self.legs: list[Leg] = []
        self.secondaries = list(params.secondaries)
        self._inbound: tuple[tuple[str, MetadataValue], ...] | None = None
        self._primary_done = False

    def channel(self, dst: Destination) -> grpc.aio.Channel:
        if isinstance(dst.channel, str):
            if self.channels is None:
                raise ProxyError(grpc.StatusCode.INTERNAL,
                                 f"destination {dst.channel!r} is a target string but the "
                                 "handler has no ChannelPool")
            return self.channels.get(dst.channel)
        return dst.channel

    def metadata(self, dst: Destination) -> Sequence[tuple[str, MetadataValue]]:
        if dst.metadata is not None:
            return forwardable(dst.metadata)
        if self._inbound is None:
            self._inbound = forwardable(self.context.invocation_metadata() or ())
        return self._inbound

    def primary_timeout(self) -> float | None:
        return _timeout(self.context, self.params.timeout)

    def secondary_timeout(self) -> float | None:
        if self.wait:
            return self.primary_timeout()
        # A mirror has its own timeout: in the background nothing else would bound it.
        limit, route = self.policy.timeout, self.params.timeout
        if route is not None:
            limit = route if limit is None else min(limit, route)
        return _timeout(self.context, limit)

    def finish_primary(self, code: grpc.StatusCode) -> None:
        if not self._primary_done:
            self._primary_done = True
            finish(self.params.primary, code)

    async def fail_to_open(self, what: str, error: BaseException,
                           others: Sequence[Destination], *, primary_failed: bool) -> _Status:
        """A leg could not be opened: the call fails and every err_handler hears of it."""
        # Opening is local (grpc.aio connects lazily): a failure here is the proxy's own, never
        # the backend's, so it must not count against the backend's health.
        code = error.code if isinstance(error, ProxyError) else grpc.StatusCode.INTERNAL
        wrapped = ProxyError(code, f"{what}: {error}")
        self.finish_primary(code if primary_failed else grpc.StatusCode.CANCELLED)
        await call_err_handler(self.params.primary, wrapped)
        for dst in others:
            finish(dst, code)
            await call_err_handler(dst, wrapped)
        for leg in self.legs:
            leg.abort(wrapped)
        await self.wait_legs()
        return _Status.own(code, f"{what} failed", wrapped.details, self.expose)

    async def reach_every_leg(self) -> _Status | None:
        """Wait mode: connect to every destination before any of them gets a message.

        Like the Go proxies (which open every stream first), a secondary that cannot be
        reached fails the call with UNAVAILABLE before the primary runs the request, unless
        its ``err_handler`` swallows the error: then the call goes on without it.
        """
        params = self.params
        if not (self.wait and params.secondaries) or params.wait_for_ready:
            return None
        dsts = [params.primary, *params.secondaries]
        try:
            channels = [self.channel(dst) for dst in dsts]
        except Exception:
            return None  # opening the legs reports it
        reached = await asyncio.gather(*(_connected(ch, self.primary_timeout())
                                         for ch in channels))
        if all(reached):
            return None
        down = [dst for dst, ok in zip(dsts, reached, strict=True) if not ok]
        down_ids = {id(dst) for dst in down}
        names = ", ".join(str(dst.channel) if isinstance(dst.channel, str) else "a channel"
                          for dst in down)
        what = "initiate primary stream" if not reached[0] else "initiate secondary stream"
        error = ProxyError(grpc.StatusCode.UNAVAILABLE, f"{what}: cannot connect to {names}")
        public = f"{what}: cannot connect"
        if reached[0]:
            kept = []
            for dst in params.secondaries:
                if id(dst) in down_ids and await call_err_handler(dst, error) is None:
                    finish(dst, grpc.StatusCode.UNAVAILABLE)
                    continue  # swallowed: this call goes on without that secondary
                kept.append(dst)
            if all(id(dst) not in down_ids for dst in kept):
                self.secondaries = kept
                return None
        for dst in dsts:
            code = grpc.StatusCode.UNAVAILABLE if id(dst) in down_ids else grpc.StatusCode.CANCELLED
            finish(dst, code)
            await call_err_handler(dst, error)
        self._primary_done = True
        return _Status.own(error.code, public, error.details, self.expose)

    async def open_legs(self, opener: Any) -> _Status | None:
        """Open every secondary with ``opener(channel, dst, timeout)``; a status on failure."""
        timeout = self.secondary_timeout()
        secondaries = list(self.secondaries)
        for index, dst in enumerate(secondaries):
            leg = Leg(dst, self.overflow)
            if not self.wait and not self.policy._admit():
                await leg.refuse(ProxyError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                            _SKIPPED.format(n=self.policy.in_flight)))
                continue
            try:
                call = opener(self.channel(dst), dst, timeout)
            except Exception as exc:
                if self.wait:  # Gitaly semantics: a secondary that cannot start fails the call
                    return await self.fail_to_open("initiate secondary stream", exc,
                                                   secondaries[index:], primary_failed=False)
                await leg.refuse(ProxyError(grpc.StatusCode.INTERNAL,
                                            f"initiate secondary stream: {exc}"))
                continue
            self.legs.append(leg)
            leg.start(call, self.policy.queue_size, None if self.wait else self.policy)
        return None

    def abort_legs(self, reason: str, *, mirrors_too: bool) -> None:
        if self.wait or mirrors_too:
            for leg in self.legs:
                leg.abort(ProxyError(grpc.StatusCode.CANCELLED, reason))

    async def wait_legs(self) -> BaseException | None:
        """In wait mode, wait for every secondary; the first error not swallowed."""
        first: BaseException | None = None
        if self.wait:
            for leg in self.legs:
                error = await leg.wait()
                if first is None and error is not None:
                    first = error
        return first

    async def finish(self, status: _Status | None, trailers: Any) -> _Status | None:
        """Run the finalizer and put the final status and trailers on the context."""
        final_error = await run_finalizer(self.params, self.expose)
        if status is None and final_error is not None:
            status = _Status.of(final_error, self.expose)
        kept = forwardable(trailers) if trailers else ()
        if kept:
            self.context.set_trailing_metadata(kept)
        if status is not None:
            self.context.set_code(status.code)
            self.context.set_details(status.details)
        return status

    async def cancelled(self, outgoing: Any, *tasks: asyncio.Future[Any]) -> None:
        """The client went away (or the server stops): no leg may outlive the call."""
        outgoing.cancel()
        self.finish_primary(grpc.StatusCode.CANCELLED)
        self.abort_legs("client cancelled", mirrors_too=True)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.wait:
            await asyncio.gather(*(leg.wait() for leg in self.legs), return_exceptions=True)
        await run_finalizer(self.params, self.expose)


async def handle_stream(context: Context, method: str, params: StreamParameters, *,
                        peeker: Peeker | None = None, channels: ChannelPool | None = None,
                        expose_errors: bool = False) -> None:
    """Proxy the call on ``context`` (a stream-stream handler over raw bytes) as ``params`` say.

    Use it from your own handler to proxy after custom logic; pass the ``peeker`` the
    director used, so a frame it read is replayed. Status, headers and trailers are set on
    ``context``; return right after. ``expose_errors`` puts addresses and exception text in
    the proxy's own error statuses (they are logged either way).

    Example::

        async def handler(request_iterator, context):
            await handle_stream(context, "/pkg.Svc/Method",
                                StreamParameters(Destination(channel)))
    """
    proxy = _Proxy(context, method, params, channels, expose_errors)
    primary = params.primary
    status = await proxy.reach_every_leg()
    if status is not None:
        await proxy.finish(status, None)
        return
    try:
        outgoing = proxy.channel(primary).stream_stream(method, None, None)(
            metadata=proxy.metadata(primary), timeout=proxy.primary_timeout(),
            compression=params.compression, wait_for_ready=params.wait_for_ready)
    except Exception as exc:
        await proxy.finish(await proxy.fail_to_open("initiate primary stream", exc,
                                                    params.secondaries, primary_failed=True),
                           None)
        return

    def open_secondary(channel: grpc.aio.Channel, dst: Destination,
                       timeout: float | None) -> Any:
        return channel.stream_stream(method, None, None)(
            metadata=proxy.metadata(dst), timeout=timeout, compression=params.compression,
            wait_for_ready=params.wait_for_ready)

    watch = StatusWatch(outgoing)
    status = await proxy.open_legs(open_secondary)
    if status is not None:
        outgoing.cancel()
        await proxy.finish(status, None)
        return

    pump = _Pump(context, outgoing, watch, primary, proxy.legs, peeker)
    pump_task = asyncio.ensure_future(pump.run())
    headers = asyncio.ensure_future(_forward_headers(context, outgoing))
    substitute: bytes | None = None
    try:
        primary_error, s2c_error = await _relay(context, outgoing, headers)
        final: FinalStatus | None = None
        if s2c_error is None and not isinstance(primary_error, ProxyError):
            final = await watch.final()
            primary_error = None if final.code is grpc.StatusCode.OK else final.error()
        if not headers.done():
            await headers
        if s2c_error is not None:
            outgoing.cancel()
            proxy.finish_primary(grpc.StatusCode.CANCELLED)
            status = _Status.own(grpc.StatusCode.INTERNAL, "failed proxying s2c",
                                 f"failed proxying s2c: {s2c_error}", proxy.expose)
            proxy.abort_legs("primary failed", mirrors_too=False)
        elif primary_error is not None:
            proxy.finish_primary(error_code(primary_error))
            verdict = await call_err_handler(primary, primary_error)
            if isinstance(verdict, BaseException):
                status = _Status.of(verdict, proxy.expose)
            elif isinstance(verdict, bytes):
                substitute = verdict
            proxy.abort_legs("primary failed", mirrors_too=False)
        else:
            proxy.finish_primary(grpc.StatusCode.OK)
        # The call is over for the client: stop reading it. The secondaries got what the
        # primary got; whatever comes after has nowhere to go.
        if not pump_task.done():
            pump_task.cancel()
        await asyncio.gather(pump_task, return_exceptions=True)
        for leg in proxy.legs:
            leg.close_input()
        secondary_error = await proxy.wait_legs()
    except asyncio.CancelledError:
        await proxy.cancelled(outgoing, pump_task, headers)
        raise

    if pump.error is not None:
        status = _Status.own(grpc.StatusCode.INTERNAL, "failed proxying c2s",
                             f"failed proxying c2s: {pump.error}", proxy.expose)
    elif status is None and secondary_error is not None:
        status = _Status.wrapped("failed proxying to secondary", secondary_error, proxy.expose)
    if substitute is not None and status is None:
        try:
            await context.write(substitute)
        except Exception as exc:  # the client is gone; nothing left to tell it
            logger.debug("substitute response not delivered: %s", exc)
    trailers = final.trailing_metadata if final is not None else None
    await proxy.finish(status, trailers)


async def _forward_headers(context: Context, call: Any) -> None:
    try:
        headers = forwardable(await call.initial_metadata())
        if headers:
            await context.send_initial_metadata(headers)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the client or the call is already gone
        logger.debug("response headers not forwarded: %s", exc)


async def _relay(context: Context, call: Any,
                 headers: asyncio.Future[None]) -> tuple[Exception | None, Exception | None]:
    """Primary -> client until the primary ends: (primary error, error writing to client)."""
    # The iterator, not read(): it still hands over buffered messages once a failed write
    # has been recorded as the call's status (see _callstatus).
    responses = call.__aiter__()
    try:
        first = True
        async for frame in responses:
            if first:
                first = False
                if not headers.done():
                    await headers  # headers go out before the first message
            try:
                await context.write(frame)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await responses.aclose()
                return None, exc
    except grpc.aio.AioRpcError as exc:
        return exc, None
    except asyncio.CancelledError:
        if task_cancelled():
            raise
        # Only the call was cancelled: the pump gave up on the client (its error wins).
        return ProxyError(grpc.StatusCode.CANCELLED, "primary call cancelled"), None
    return None, None


class _Pump:
    """Client -> secondaries and primary, then half-close them all."""

    __slots__ = ("_open", "call", "context", "error", "legs", "peeker", "primary", "watch")

    def __init__(self, context: Context, call: Any, watch: StatusWatch, primary: Destination,
                 legs: list[Leg], peeker: Peeker | None) -> None:
        self.context = context
        self.call = call
        self.watch = watch
        self.primary = primary
        self.legs = legs
        self.peeker = peeker
        self.error: BaseException | None = None
        self._open = True

    async def _to_primary(self, frame: bytes) -> None:
        if self._open:
            try:
                await self.call.write(frame)
            except _CALL_ENDED:
                self._open = False  # the primary already ended; the relay reports how
                self.watch.write_failed = True

    async def _first(self) -> bool:
        """Send the first frames; False when the client stream is already over."""
        peeker = self.peeker
        if peeker is not None and peeker.peeked:
            frame = peeker.frame
            for leg in self.legs:
                first = leg.dst.msg if leg.dst.msg is not None else frame
                if first is not None:
                    await leg.send(first)
            first = self.primary.msg if self.primary.msg is not None else frame
            if first is not None:
                await self._to_primary(first)
            return frame is not None
        # Nothing was peeked: the stream goes through untouched, after any injected message.
        for leg in self.legs:
            if leg.dst.msg is not None:
                await leg.send(leg.dst.msg)
        if self.primary.msg is not None:
            await self._to_primary(self.primary.msg)
        return True

    async def run(self) -> None:
        legs = self.legs
        try:
            if await self._first():
                read = self.context.read
                while True:
                    try:
                        frame = await read()
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        self.error = exc
                        self.call.cancel()  # a broken client stream ends every leg
                        for leg in legs:
                            leg.abort(ProxyError(grpc.StatusCode.CANCELLED, "client failed"))
                        return
                    if frame is _EOF:
                        break
                    for leg in legs:
                        await leg.send(frame)
                    await self._to_primary(frame)
        finally:
            for leg in legs:
                leg.close_input()
        if self._open:
            with contextlib.suppress(*_CALL_ENDED):
                await self.call.done_writing()


async def handle_unary(context: Context, method: str, request: bytes, params: StreamParameters,
                       *, channels: ChannelPool | None = None,
                       expose_errors: bool = False) -> bytes | None:
    """Proxy a call known to be unary (the fast path): one request, one response.

    Returns the response bytes for a unary-unary handler without serializers; on failure the
    status is set on ``context`` and None returned. A primary ``err_handler`` cannot turn a
    failed unary call into OK without a message: returning None keeps the original error,
    returning bytes answers with them.

    Example::

        async def handler(request, context):
            return await handle_unary(context, "/pkg.Svc/Get", request,
                                      StreamParameters(Destination(channel)))
    """
    proxy = _Proxy(context, method, params, channels, expose_errors)
    primary = params.primary
    status = await proxy.reach_every_leg()
    if status is not None:
        await proxy.finish(status, None)
        return None
    try:
        outgoing = proxy.channel(primary).unary_unary(method, None, None)(
            primary.msg if primary.msg is not None else request,
            metadata=proxy.metadata(primary), timeout=proxy.primary_timeout(),
            compression=params.compression, wait_for_ready=params.wait_for_ready)
    except Exception as exc:
        await proxy.finish(await proxy.fail_to_open("initiate primary call", exc,
                                                    params.secondaries, primary_failed=True),
                           None)
        return None

    def open_secondary(channel: grpc.aio.Channel, dst: Destination,
                       timeout: float | None) -> Any:
        return channel.unary_unary(method, None, None)(
            dst.msg if dst.msg is not None else request, metadata=proxy.metadata(dst),
            timeout=timeout, compression=params.compression,
            wait_for_ready=params.wait_for_ready)

    status = await proxy.open_legs(open_secondary) if proxy.secondaries else None
    if status is not None:
        outgoing.cancel()
        await proxy.finish(status, None)
        return None

    response: bytes | None = None
    try:
        try:
            response = await outgoing
            proxy.finish_primary(grpc.StatusCode.OK)
            headers = await outgoing.initial_metadata()
            trailers = await outgoing.trailing_metadata()
        except grpc.aio.AioRpcError as exc:
            proxy.finish_primary(exc.code())
            headers, trailers = exc.initial_metadata(), exc.trailing_metadata()
            verdict = await call_err_handler(primary, exc)
            if isinstance(verdict, bytes):
                response = verdict
            else:
                status = _Status.of(exc if verdict is None else verdict, proxy.expose)
            proxy.abort_legs("primary failed", mirrors_too=False)
        secondary_error = await proxy.wait_legs()
    except asyncio.CancelledError:
        await proxy.cancelled(outgoing)
        raise
    if status is None and secondary_error is not None:
        status = _Status.wrapped("failed proxying to secondary", secondary_error, proxy.expose)
    kept = forwardable(headers or ())
    if kept:
        try:
            await context.send_initial_metadata(kept)
        except Exception as exc:
            logger.debug("response headers not forwarded: %s", exc)
    if await proxy.finish(status, trailers) is not None:
        return None
    return response
