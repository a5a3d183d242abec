"""`CalloutServer`: Envoy's L7 external processing (``envoy.service.ext_proc.v3``).

Envoy opens one bidirectional stream per HTTP request and sends one message per phase
(request headers, body chunks, trailers, then the same for the response). For each message the
server calls the matching ``on_<phase>`` callback and sends exactly one typed reply back,
fixing up what Envoy would otherwise reject: content-length after a BUFFERED body change,
``streamed_response`` in FULL_DUPLEX_STREAMED mode, ``raw_value`` in header mutations.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from types import CoroutineType
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ..runtime import _logging
from ..runtime._errors import CalloutError, ErrorPolicy, StreamAbort, parse_error_policy
from ..runtime._invoke import Invoker, on_loop
from ..runtime._malformed import RateLimitedLog
from ..runtime._server import BaseServer, Handlers
from ._context import CalloutContext

if TYPE_CHECKING:
    from ..runtime._metrics import ServerMetrics

logger = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"

_Mode = processing_mode_pb2.ProcessingMode
_BUFFERED = (_Mode.BUFFERED, _Mode.BUFFERED_PARTIAL)
_DUPLEX = (_Mode.FULL_DUPLEX_STREAMED, _Mode.GRPC)
_STREAMING = (_Mode.STREAMED, *_DUPLEX)
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

_HEADERS, _BODY, _TRAILERS = 0, 1, 2
# A reply on its way to the stream: a message, or already framed as its wire bytes.
_Reply: TypeAlias = "pb.ProcessingResponse | bytes"
# phase -> (reply type the callback may return, direction: 0 request / 1 response, kind)
_PHASES: dict[str, tuple[type, int, int]] = {
    "request_headers": (pb.HeadersResponse, 0, _HEADERS),
    "response_headers": (pb.HeadersResponse, 1, _HEADERS),
    "request_body": (pb.BodyResponse, 0, _BODY),
    "response_body": (pb.BodyResponse, 1, _BODY),
    "request_trailers": (pb.TrailersResponse, 0, _TRAILERS),
    "response_trailers": (pb.TrailersResponse, 1, _TRAILERS),
}


# What a callback may return, recognised by class before anything slower is tried.
_REPLY_CLASSES = frozenset({type(None), pb.HeadersResponse, pb.BodyResponse, pb.TrailersResponse,
                            pb.ImmediateResponse, pb.ProcessingResponse})




_GENERIC_ERROR_BODY = b"internal error in callout\n"

# A ProcessingResponse with one field set is, on the wire, that field's tag, its length and
# the typed reply itself: replies are framed that way rather than built and copied.
_TAG = {phase: bytes((pb.ProcessingResponse.DESCRIPTOR.fields_by_name[phase].number << 3 | 2,))
        for phase in _PHASES}
_EMPTY_REPLY = {phase: tag + b"\x00" for phase, tag in _TAG.items()}
_SMALL_LENGTH = [bytes((n,)) for n in range(0x80)]
_NO_PHASE_REPLY = b""  # an empty ProcessingResponse, on the wire


def _metered(answer: Callable[..., Any], metrics: ServerMetrics) -> Callable[..., Any]:
    """``answer``, counting each message by phase and each immediate response by status."""
    message, immediate = metrics.message, metrics.immediate_response

    def count(reply: Any) -> Any:
        if reply.__class__ is pb.ProcessingResponse and reply.HasField("immediate_response"):
            immediate(reply.immediate_response.status.code)
        return reply

    async def finish(pending: Awaitable[Any]) -> Any:
        return count(await pending)

    def metered(request: pb.ProcessingRequest, context: CalloutContext) -> Any:
        message(request.WhichOneof("request") or "none")
        reply = answer(request, context)
        if reply.__class__ is CoroutineType:
            return finish(reply)
        return count(reply)

    return metered


def _frame(tag: bytes, message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    size = len(data)
    if size < 0x80:
        return tag + _SMALL_LENGTH[size] + data
    length = bytearray()
    while size >= 0x80:
        length.append(size & 0x7F | 0x80)
        size >>= 7
    length.append(size)
    return tag + length + data


class CalloutServer(BaseServer):
    """An Envoy ext_proc server: override the ``on_*`` callbacks you need.

    Each callback receives the phase's message and a `CalloutContext`, may be ``def`` or
    ``async def``, and returns one of: ``None`` (continue unmodified), the phase's typed reply
    (`HeadersResponse`, `BodyResponse`, `TrailersResponse`), an `ImmediateResponse`, or a
    complete `ProcessingResponse`. Override `process` to handle raw `ProcessingRequest`s.

    Constructor options are those of the documented callout API (``address``, ``port``,
    ``plaintext_address``, ``health_check_port``, ``cert_chain_path``, ...), plus
    ``secure_address``, ``disable_tls``, ``grace_period``, ``max_message_size``,
    ``reflection`` and ``error_policy``.

    Example::

        from calloutkit import CalloutServer, add_header_mutation

        class Server(CalloutServer):
            def on_response_headers(self, headers, context):
                return add_header_mutation(add=[("foo", "bar")])

        if __name__ == "__main__":
            Server().run()
    """

    protocol = "ext_proc"

    def __init__(self, *args: Any, error_policy: ErrorPolicy | str = ErrorPolicy.FAIL_CLOSED,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.error_policy = parse_error_policy(error_policy)
        self._no_phase = RateLimitedLog(logger, logging.WARNING)
        self._custom_process = self._overridden("process", CalloutServer)
        self._callbacks: dict[str, Invoker | None] = {
            phase: self._overridden(f"on_{phase}", CalloutServer) for phase in _PHASES}
        self._warned_value_only = False

    # -- the documented callbacks -----------------------------------------------------------

    def on_request_headers(self, headers: pb.HttpHeaders, context: Any) -> Any:
        """Request headers arrived. Return None, HeadersResponse or ImmediateResponse."""
        return None

    def on_response_headers(self, headers: pb.HttpHeaders, context: Any) -> Any:
        """Response headers arrived. Return None, HeadersResponse or ImmediateResponse."""
        return None

    def on_request_body(self, body: pb.HttpBody, context: Any) -> Any:
        """A request body (or chunk) arrived. Return None, BodyResponse or ImmediateResponse."""
        return None

    def on_response_body(self, body: pb.HttpBody, context: Any) -> Any:
        """A response body (or chunk) arrived. Return None, BodyResponse or ImmediateResponse."""
        return None

    def on_request_trailers(self, trailers: pb.HttpTrailers, context: Any) -> Any:
        """Request trailers arrived. Return None, TrailersResponse or ImmediateResponse."""
        return None

    def on_response_trailers(self, trailers: pb.HttpTrailers, context: Any) -> Any:
        """Response trailers arrived. Return None or TrailersResponse."""
        return None

    def new_state(self) -> Any:
        """Make the per-stream state object (``context.state``); a SimpleNamespace by default."""
        return None

    def process(self, callout: pb.ProcessingRequest, context: CalloutContext) -> Any:
        """Answer one `ProcessingRequest`: by default, dispatch to the ``on_*`` callbacks.

        Override it (``def`` or ``async def``) to work on raw messages; return the
        `ProcessingResponse` to send. Returning None sends nothing for that message, which
        Envoy only tolerates in observability mode.

        ``super().process(callout, context)`` gives the `ProcessingResponse` the callbacks
        answer: directly when called from a ``def`` override, as an awaitable when called
        from an ``async def`` one (``await super().process(...)``).
        """
        # The documented API's process is a plain def, and code written for it calls
        # super().process() and uses the message; calloutkit's async overrides await it.
        # Which of the two called is known from the calling frame, for free.
        caller = sys._getframe(1).f_code.co_flags
        if caller & inspect.CO_COROUTINE:
            return self._process_async(callout, context)
        return _as_message(self._dispatch_blocking(callout, context))

    async def _process_async(self, callout: pb.ProcessingRequest,
                             context: CalloutContext) -> pb.ProcessingResponse | None:
        return _as_message(await self._dispatch(callout, context))

    def _dispatch_blocking(self, request: pb.ProcessingRequest,
                           context: CalloutContext) -> _Reply | None:
        """`_dispatch` for a ``def process`` override, which runs in a pool thread (or inline).

        A ``def`` callback is called right here: this thread may block, and sending it to the
        pool from a pool thread could wait for ever on a full pool (from a ``@nonblocking``
        process it runs on the loop, as the process itself does). An ``async def`` one runs on
        the server's loop while this thread waits for it.
        """
        phase = request.WhichOneof("request")
        callback = None if phase is None else self._callbacks[phase]
        if phase is None or callback is None:
            return self._dispatch_now(request, context)  # no callback: ready at once
        message = getattr(request, phase)
        _remember(phase, message, request, context)
        try:
            result = callback.func(message, context)
            if result.__class__ not in _REPLY_CLASSES and inspect.isawaitable(result):
                result = self._wait(result)
            return self._reply(phase, result, request, context)
        except StreamAbort:
            raise
        except Exception:
            return self._callback_failed(phase, request, context)

    def _wait(self, pending: Awaitable[Any]) -> Any:
        async def wait() -> Any:
            return await pending

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            if inspect.iscoroutine(pending):
                pending.close()
            raise CalloutError("an async on_* callback cannot be waited for from a "
                               "@nonblocking def process(); make process async def")
        loop = self._loop
        if loop is not None and loop.is_running():
            return asyncio.run_coroutine_threadsafe(wait(), loop).result()
        return asyncio.run(wait())  # a server that is not running: called from plain code

    # -- the stream ---------------------------------------------------------------------------

    def _handlers(self) -> Handlers:
        return [self._bidi_handler(SERVICE_NAME, self._stream)]

    @functools.cached_property
    def _stream(self) -> Callable[[AsyncIterator[bytes], Any], AsyncIterator[bytes]]:
        # Left at its default, new_state is not called: the context makes the namespace.
        custom_state = type(self).new_state is not CalloutServer.new_state
        new_context: Callable[[Any], CalloutContext] = (
            self._new_context if custom_state else CalloutContext)
        answer: Callable[..., Any] = self._answer
        if self._server_metrics is not None:
            answer = _metered(answer, self._server_metrics)
        if _logging.enabled:
            new_context, answer = _with_stream_log(new_context, answer)
        # An async callback is called straight from `_dispatch_now`, not through its Invoker:
        # such a server's answers start on the loop, as they always did.
        off_loop = not any(callback is not None and callback.is_async
                           for callback in self._callbacks.values())
        return self._stream_function(new_context, answer, pb.ProcessingRequest,
                                     off_loop=off_loop)

    def _new_context(self, grpc_context: Any) -> CalloutContext:
        return CalloutContext(grpc_context, self.new_state())

    def _answer(self, request: pb.ProcessingRequest, context: CalloutContext,
                ) -> _Reply | Coroutine[Any, Any, Any] | None:
        """The stream's step: the reply itself when it is ready at once (no callback, or an
        inline one), else a coroutine that produces it. Envoy sends one message per phase and
        waits for the reply, so every coroutine frame saved here is saved on every message."""
        context.request = request
        if request.HasField("protocol_config"):
            config = request.protocol_config
            context.request_body_mode = config.request_body_mode
            context.response_body_mode = config.response_body_mode
        if self._custom_process is not None:
            return self._run_process(request, context)
        # In observability mode too: Envoy reads no reply then, but a client written for the
        # documented server waits for one.
        return self._dispatch_now(request, context)

    async def _run_process(self, request: pb.ProcessingRequest,
                           context: CalloutContext) -> _Reply | None:
        assert self._custom_process is not None
        try:
            response = await self._custom_process(request, context)
            if response is not None and not isinstance(response, pb.ProcessingResponse):
                raise CalloutError(f"process() returned {type(response).__name__}; expected "
                                   "ProcessingResponse or None")
        except StreamAbort:
            raise
        except Exception:
            logger.exception("process() failed")
            response = self._on_error(request.WhichOneof("request"), request, context)
        return response

    async def _dispatch(self, request: pb.ProcessingRequest,
                        context: CalloutContext) -> _Reply | None:
        reply = self._dispatch_now(request, context)
        if reply.__class__ is CoroutineType:
            return await reply  # type: ignore[no-any-return, misc]
        return reply  # type: ignore[return-value]

    def _dispatch_now(self, request: pb.ProcessingRequest, context: CalloutContext,
                      ) -> _Reply | Coroutine[Any, Any, Any] | None:
        phase = request.WhichOneof("request")
        if phase is None:
            # Nothing to dispatch; an empty reply, as the documented server gives, keeps a
            # client that waits for one answer per message going.
            self._no_phase("ProcessingRequest without a phase; answering it empty")
            return _NO_PHASE_REPLY
        message = getattr(request, phase)
        # _remember, inlined: this runs for every message of every stream.
        if phase == "request_headers":
            context.request_headers = message
            context._request_start = request
        elif phase == "response_headers":
            context.response_headers = message
            context._response_start = request
        elif phase == "request_trailers":
            context._request_trailers = message
        elif phase == "response_trailers":
            context._response_trailers = message
        callback = self._callbacks[phase]
        if callback is None:
            return self._reply(phase, None, request, context)
        if callback.is_async:
            return self._finish(phase, callback.func(message, context), request, context)
        if not callback.is_inline:
            return self._finish(phase, callback(message, context), request, context)
        # The same try as in _finish, written twice on purpose: an inline callback must not
        # pay for a coroutine.
        try:
            result = callback.func(message, context)
            if result.__class__ not in _REPLY_CLASSES and inspect.isawaitable(result):
                return self._finish(phase, on_loop(result), request, context)
            return self._reply(phase, result, request, context)
        except StreamAbort:
            raise
        except Exception:
            return self._callback_failed(phase, request, context)

    async def _finish(self, phase: str, pending: Awaitable[Any], request: pb.ProcessingRequest,
                      context: CalloutContext) -> _Reply | None:
        try:
            return self._reply(phase, await pending, request, context)
        except StreamAbort:
            raise
        except Exception:
            return self._callback_failed(phase, request, context)

    def _callback_failed(self, phase: str, request: pb.ProcessingRequest,
                         context: CalloutContext) -> _Reply | None:
        logger.exception("on_%s failed", phase)
        return self._on_error(phase, request, context)

    def _on_error(self, phase: str | None, request: pb.ProcessingRequest,
                  context: CalloutContext) -> _Reply | None:
        if self.error_policy is ErrorPolicy.ABORT or phase is None:
            raise StreamAbort(grpc.StatusCode.INTERNAL, "callout failed")
        if self.error_policy is ErrorPolicy.CONTINUE:
            return self._reply(phase, None, request, context)
        immediate = pb.ImmediateResponse(body=_GENERIC_ERROR_BODY,
                                         details="calloutkit_callback_error")
        immediate.status.code = 500
        return pb.ProcessingResponse(immediate_response=immediate)

    def _reply(self, phase: str, result: Any, request: pb.ProcessingRequest,
               context: CalloutContext) -> _Reply:
        expected, direction, kind = _PHASES[phase]
        which: str | None = phase
        if result is None or isinstance(result, expected):
            if self._sendable_as_is(kind, direction, result, request, phase, context):
                # The common case: framed straight from the callback's own message, with no
                # ProcessingResponse built around it and no copy of it.
                return _EMPTY_REPLY[phase] if result is None else _frame(_TAG[phase], result)
            # A fix-up depends on this request: made on a copy, so that a reply object the
            # callback keeps and returns again is never changed by it.
            response = pb.ProcessingResponse()
            if result is None:
                getattr(response, phase).SetInParent()
            else:
                getattr(response, phase).CopyFrom(result)
        elif isinstance(result, pb.ProcessingResponse):
            response = result
            which = response.WhichOneof("response")
            if which == "immediate_response":
                _fix_value_only(response.immediate_response.headers, self)
                return response
            if which is None:
                return response
            kind = _PHASES[which][2]
        elif isinstance(result, pb.ImmediateResponse):
            _fix_value_only(result.headers, self)
            return pb.ProcessingResponse(immediate_response=result)
        else:
            raise CalloutError(f"on_{phase} returned {type(result).__name__}; expected None, "
                               f"{expected.__name__}, ImmediateResponse or ProcessingResponse")
        payload = getattr(response, str(which))
        if kind == _TRAILERS:
            _fix_value_only(payload.header_mutation, self)
            return response
        common = payload.response
        _fix_value_only(common.header_mutation, self)
        if kind == _HEADERS:
            # Only a whole ProcessingResponse can carry a mode_override.
            if result is response and response.HasField("mode_override"):
                self._apply_override(response.mode_override, common, direction, context)
            if (direction == 1 and context._strip_response_length
                    and _has_content_length(context.response_headers)):
                common.header_mutation.remove_headers.append("content-length")
        else:
            _shape_body(common, getattr(request, phase, None), direction, context)
        return response

    def _sendable_as_is(self, kind: int, direction: int, result: Any,
                        request: pb.ProcessingRequest, phase: str,
                        context: CalloutContext) -> bool:
        """True when a typed reply (or None) needs no fix-up that depends on the request.

        The one fix-up that does not, a value-only header copied to raw_value, is made here,
        in place: it gives the same result however often it is applied.
        """
        if result is not None:
            _fix_value_only((result if kind == _TRAILERS else result.response).header_mutation,
                            self)
        if kind == _HEADERS:
            return direction == 0 or not context._strip_response_length
        if kind == _TRAILERS:
            return True
        mode = context.request_body_mode if direction == 0 else context.response_body_mode
        if result is None:
            return mode not in _DUPLEX  # FULL_DUPLEX_STREAMED echoes the chunk back
        return _body_kept(result.response.body_mutation, getattr(request, phase), mode)

    def _apply_override(self, override: Any, common: pb.CommonResponse, direction: int,
                        context: CalloutContext) -> None:
        if direction == 0:
            if (override.request_body_mode in _STREAMING
                    and context.request_body_mode not in _STREAMING
                    and _has_content_length(context.request_headers)):
                # Envoy strips content-length only for modes configured as streaming; after
                # an override a changed chunk would otherwise mismatch it and give a 500.
                common.header_mutation.remove_headers.append("content-length")
            context.request_body_mode = override.request_body_mode
        if (override.response_body_mode in _STREAMING
                and context.response_body_mode not in _STREAMING):
            context._strip_response_length = True
        context.response_body_mode = override.response_body_mode


def _with_stream_log(new_context: Callable[[Any], CalloutContext], answer: Callable[..., Any],
                     ) -> tuple[Callable[[Any], CalloutContext], Callable[..., Any]]:
    """Wrap a stream's two steps so that its log records carry the stream's ids.

    Only when a log handler asked for them (`runtime._logging`): otherwise the stream pays
    nothing. The request id comes from the gRPC metadata at once, then from the request
    headers' ``x-request-id`` (what Envoy sets) when they arrive, before their callback runs.
    """
    def logged_context(grpc_context: Any) -> CalloutContext:
        _logging.begin_stream(_logging.metadata_request_id(grpc_context))
        return new_context(grpc_context)

    def logged_answer(request: pb.ProcessingRequest, context: CalloutContext) -> Any:
        if request.WhichOneof("request") == "request_headers":
            log = _logging.current.get()
            for header in request.request_headers.headers.headers:
                if header.key == _logging.REQUEST_ID_HEADER and log is not None:
                    log.request_id = header.raw_value.decode("latin-1") or header.value
                    break
        return answer(request, context)

    return logged_context, logged_answer


def _remember(phase: str, message: Any, request: pb.ProcessingRequest,
              context: CalloutContext) -> None:
    """Keep what later phases read through the context: the headers, the request that
    carried them (its attributes) and the trailers. References only; nothing is copied."""
    if phase == "request_headers":
        context.request_headers = message
        context._request_start = request
    elif phase == "response_headers":
        context.response_headers = message
        context._response_start = request
    elif phase == "request_trailers":
        context._request_trailers = message
    elif phase == "response_trailers":
        context._response_trailers = message


def _as_message(reply: _Reply | None) -> pb.ProcessingResponse | None:
    # The on_* path frames its replies as wire bytes; a process() override sees messages.
    if isinstance(reply, bytes):
        return pb.ProcessingResponse.FromString(reply)
    return reply


def _has_content_length(headers: pb.HttpHeaders | None) -> bool:
    # Looked up only when a fix-up may need it: scanning every header message costs more.
    return headers is not None and any(
        h.key == "content-length" for h in headers.headers.headers)


def _body_kept(mutation: pb.BodyMutation, body: pb.HttpBody | None, mode: int) -> bool:
    """True when `_shape_body` would leave this body mutation as it is (nothing changed)."""
    if mode in _DUPLEX:
        return mutation.WhichOneof("mutation") == "streamed_response"  # type: ignore[no-any-return]
    if mode not in _BUFFERED:
        return True
    kind = mutation.WhichOneof("mutation")
    if kind == "body":
        length = len(mutation.body)
    elif kind == "clear_body":
        length = 0
    else:
        return True
    return body is not None and length == len(body.body)


def _shape_body(common: pb.CommonResponse, body: pb.HttpBody | None, direction: int,
                context: CalloutContext) -> None:
    mode = context.request_body_mode if direction == 0 else context.response_body_mode
    mutation = common.body_mutation
    if _body_kept(mutation, body, mode):
        return
    kind = mutation.WhichOneof("mutation")
    if mode in _DUPLEX:
        # FULL_DUPLEX_STREAMED only accepts streamed_response; Envoy forwards nothing else.
        data = mutation.body if kind == "body" else (
            b"" if kind == "clear_body" else (body.body if body is not None else b""))
        mutation.streamed_response.body = data
        mutation.streamed_response.end_of_stream = bool(body is not None and body.end_of_stream)
        return
    # BUFFERED, and the body's length changed: content-length must follow it.
    length = len(mutation.body) if kind == "body" else 0
    headers = context.request_headers if direction == 0 else context.response_headers
    if _has_content_length(headers) and not any(
            o.header.key.lower() == "content-length" for o in common.header_mutation.set_headers):
        common.header_mutation.set_headers.append(base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="content-length", raw_value=str(length).encode()),
            append_action=_OVERWRITE))


def _fix_value_only(mutation: Any, server: CalloutServer) -> None:
    # Serializing the mutation costs far less than walking its headers from Python, and a
    # header whose `value` is set puts that field's tag byte (0x12) in those bytes: no 0x12,
    # nothing to fix. (remove_headers and `append` are tagged 0x12 too; they cost the walk.)
    # An int needle: a bytes one makes `in` raise and clear a TypeError internally first.
    if 0x12 not in mutation.SerializeToString():
        return
    for option in mutation.set_headers:
        header = option.header
        if header.value and not header.raw_value:
            # Envoy reads only raw_value; a value-only header would arrive empty.
            header.raw_value = header.value.encode()
            if not server._warned_value_only:
                server._warned_value_only = True
                logger.warning("header %r was set with HeaderValue.value only; Envoy ignores "
                               "value, so calloutkit copied it to raw_value", header.key)
