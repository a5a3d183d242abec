"""`NetworkCalloutServer`: Envoy's L4 network external processing.

Envoy's ``envoy.filters.network.ext_proc`` filter opens one bidirectional stream
(``envoy.service.network_ext_proc.v3.NetworkExternalProcessor/Process``) per TCP connection and
sends each chunk it reads from the client as ``read_data`` and each chunk the upstream writes
back as ``write_data``. It holds the chunk until the answer arrives, then forwards the bytes
*in the answer*, whatever ``data_processing_status`` says: an answer without data for that
direction silently drops the chunk, and an answer for the other direction injects bytes the
wrong way. So this server answers every message, in order, in the direction it came from, with
the original bytes copied back when the callback changes nothing.

``connection_status`` CLOSE (FIN) or CLOSE_RST (RST) ends the connection; Envoy acts on it
before the data in the same answer, so the chunk being answered is not forwarded.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, NamedTuple, NoReturn, TypeAlias

import grpc
from envoy.service.network_ext_proc.v3 import network_external_processor_pb2 as npb
from google.protobuf import json_format, struct_pb2

from ..runtime import _logging
from ..runtime._errors import CalloutError, ErrorPolicy, StreamAbort, parse_error_policy
from ..runtime._malformed import RateLimitedLog
from ..runtime._server import BaseServer, Handlers
from ..runtime._tls import PeerIdentity, peer_identity

logger = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.network_ext_proc.v3.NetworkExternalProcessor"

_Response = npb.ProcessingResponse
_CONTINUE = _Response.CONTINUE
_CLOSE = _Response.CLOSE
_CLOSE_RST = _Response.CLOSE_RST
_DIRECTIONS = ("read_data", "write_data")


class ProcessingResult(NamedTuple):
    """What ``on_read_data`` / ``on_write_data`` return: the bytes to forward, and whether
    they differ from what arrived.

    Envoy forwards ``processed_data`` in place of the chunk (an empty value drops the chunk);
    ``modified`` sets the MODIFIED / UNMODIFIED status Envoy records. Returning None instead
    forwards the chunk unchanged. A plain ``(bytes, bool)`` tuple is accepted too.

    Example::

        def on_read_data(self, data, end_of_stream, context):
            if b"secret" not in data:
                return None
            return ProcessingResult(processed_data=data.replace(b"secret", b"******"),
                                    modified=True)
    """

    processed_data: bytes
    modified: bool = True


#: What a data callback may return: ``def`` callbacks return the value, ``async def`` ones
#: a coroutine of it.
DataResult: TypeAlias = "ProcessingResult | Awaitable[ProcessingResult | None] | None"


class NetworkContext:
    """What a network callback knows about its TCP connection, beyond the chunk it was handed.

    One context lives as long as the connection (one gRPC stream). Attributes:

    - ``state``: your per-connection object (a `types.SimpleNamespace` unless `new_state`
      says otherwise).
    - ``request``: the whole `ProcessingRequest` being handled.
    - ``metadata``: the dynamic metadata Envoy forwarded (``metadata_options.
      forwarding_namespaces``) as ``{namespace: {key: value}}``, from the latest message that
      carried any; ``{}`` when none did.
    - ``bytes_read`` / ``bytes_written``: bytes seen so far from the client / the upstream,
      the current chunk included.
    - ``read_closed`` / ``write_closed``: the client / the upstream has half-closed.

    Anything else (``invocation_metadata()``, ``peer()``, ...) is passed to the gRPC context.

    Example::

        def on_read_data(self, data, end_of_stream, context):
            context.state.commands = getattr(context.state, "commands", 0) + 1
            if context.bytes_read > 1_000_000:
                context.reset_connection()
    """

    __slots__ = ("_dynamic", "_grpc", "_metadata", "_metadata_proto", "_status", "bytes_read",
                 "bytes_written", "read_closed", "request", "state", "write_closed")

    def __init__(self, grpc_context: Any, state: Any = None) -> None:
        self._grpc = grpc_context
        self.state: Any = types.SimpleNamespace() if state is None else state
        self.request: npb.ProcessingRequest | None = None
        self.bytes_read = 0
        self.bytes_written = 0
        self.read_closed = False
        self.write_closed = False
        self._status = _CONTINUE
        self._dynamic: struct_pb2.Struct | None = None
        self._metadata_proto: Any = None
        self._metadata: dict[str, Any] | None = None

    @property
    def grpc_context(self) -> Any:
        """The underlying `grpc.aio.ServicerContext`."""
        return self._grpc

    @property
    def peer_identity(self) -> PeerIdentity | None:
        """The client certificate Envoy presented (mTLS, ``client_ca_path``); else None."""
        return peer_identity(self._grpc)

    @property
    def metadata(self) -> dict[str, Any]:
        """Forwarded dynamic metadata, ``{namespace: {key: value}}`` (converted on first use)."""
        if self._metadata is None:
            proto = self._metadata_proto
            self._metadata = {} if proto is None else {
                ns: json_format.MessageToDict(values)
                for ns, values in proto.filter_metadata.items()}
        return self._metadata

    def close_connection(self) -> None:
        """Close the TCP connection (FIN) when this chunk is answered; the chunk is dropped,
        bytes already forwarded are flushed to the client first."""
        if self._status != _CLOSE_RST:
            self._status = _CLOSE

    def reset_connection(self) -> None:
        """Reset the TCP connection (RST) when this chunk is answered; nothing more is sent."""
        self._status = _CLOSE_RST

    def set_dynamic_metadata(self, namespace: str, values: Mapping[str, Any]) -> None:
        """Attach ``{namespace: values}`` to the next answer as connection dynamic metadata.

        Envoy keeps only namespaces listed in ``metadata_options.receiving_namespaces``::

            context.set_dynamic_metadata("calloutkit", {"tenant": "a"})
        """
        if self._dynamic is None:
            self._dynamic = struct_pb2.Struct()
        self._dynamic.update({namespace: dict(values)})

    def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        """End the stream now with a gRPC status; Envoy then closes the connection, or lets
        the rest through unprocessed with ``failure_mode_allow: true``."""
        raise StreamAbort(code, details)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grpc, name)


class NetworkCalloutServer(BaseServer):
    """An Envoy network ext_proc (L4, TCP) server: override the callbacks you need.

    - ``on_read_data(data, end_of_stream, context)``: bytes from the client to the upstream.
    - ``on_write_data(data, end_of_stream, context)``: bytes from the upstream to the client.
    - ``should_close_connection(data, modified, context)``: after each of them, True closes
      the connection (``context.reset_connection()`` resets it instead).

    Callbacks may be ``def`` (run in the thread pool, or inline with `nonblocking`) or
    ``async def``, and return `ProcessingResult` or None (forward unchanged). ``context`` is
    the connection's `NetworkContext`. Override `process` to handle raw `ProcessingRequest`s.

    Options are those of `CalloutServer` (listeners, TLS, health, drain, ``workers``), and
    ``error_policy`` for a callback that raises or returns the wrong type (always logged):

    - ``ErrorPolicy.FAIL_CLOSED`` (default): close the connection (FIN); the chunk is dropped.
    - ``ErrorPolicy.CONTINUE``: forward the chunk unchanged and keep the connection.
    - ``ErrorPolicy.ABORT``: end the stream with gRPC INTERNAL; Envoy closes the connection, or
      with ``failure_mode_allow: true`` passes the rest through unprocessed.

    Example::

        from calloutkit import NetworkCalloutServer, ProcessingResult

        class Upper(NetworkCalloutServer):
            def on_read_data(self, data, end_of_stream, context):
                return ProcessingResult(data.upper(), modified=True)

        if __name__ == "__main__":
            Upper().run()
    """

    protocol = "network_ext_proc"

    def __init__(self, *args: Any, error_policy: ErrorPolicy | str = ErrorPolicy.FAIL_CLOSED,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.error_policy = parse_error_policy(error_policy)
        self._no_direction = RateLimitedLog(logger, logging.WARNING)
        base = NetworkCalloutServer
        self._custom_process = self._overridden("process", base)
        self._callbacks = {"read_data": self._overridden("on_read_data", base),
                           "write_data": self._overridden("on_write_data", base)}
        self._should_close = self._overridden("should_close_connection", base)

    # -- the documented callbacks -----------------------------------------------------------

    def on_read_data(self, data: bytes, end_of_stream: bool,
                     context: NetworkContext) -> DataResult:
        """Bytes from the client arrived. Return None (forward them) or `ProcessingResult`."""
        return None

    def on_write_data(self, data: bytes, end_of_stream: bool,
                      context: NetworkContext) -> DataResult:
        """Bytes from the upstream arrived. Return None (forward them) or `ProcessingResult`."""
        return None

    def should_close_connection(self, data: bytes, modified: bool,
                                context: NetworkContext) -> bool | Awaitable[bool]:
        """Called after each data callback with the chunk as it arrived; True closes (FIN)."""
        return False

    def new_state(self) -> Any:
        """Make the per-connection state object (``context.state``); a SimpleNamespace if None."""
        return None

    def process(self, callout: npb.ProcessingRequest, context: NetworkContext,
                ) -> npb.ProcessingResponse | Awaitable[npb.ProcessingResponse | None] | None:
        """Answer one raw `ProcessingRequest`: by default, dispatch to the callbacks.

        Override it (``def`` or ``async def``) to build the `ProcessingResponse` yourself;
        returning None forwards the chunk unchanged.
        """
        return self._dispatch(callout, context)

    # -- the stream ---------------------------------------------------------------------------

    def _handlers(self) -> Handlers:
        return [self._bidi_handler(SERVICE_NAME, self._stream)]

    @functools.cached_property
    def _stream(self) -> Callable[[AsyncIterator[bytes], Any], AsyncIterator[bytes]]:
        new_context = self._new_context
        answer: Callable[..., Any] = self._answer
        if self._server_metrics is not None:
            count = self._server_metrics.message

            def answer(request: npb.ProcessingRequest, context: NetworkContext) -> Any:
                count(_direction(request) or "none")
                return self._answer(request, context)
        if _logging.enabled:  # log records name the connection's stream (runtime._logging)
            new_context = self._new_logged_context
        # A stream here is a whole TCP connection: a drain lets open connections go on.
        return self._stream_function(new_context, answer, npb.ProcessingRequest,
                                     end_idle_on_drain=False)

    def _new_logged_context(self, grpc_context: Any) -> NetworkContext:
        _logging.begin_stream(_logging.metadata_request_id(grpc_context))
        return self._new_context(grpc_context)

    def _new_context(self, grpc_context: Any) -> NetworkContext:
        return NetworkContext(grpc_context, self.new_state())

    async def _answer(self, request: npb.ProcessingRequest,
                      context: NetworkContext) -> npb.ProcessingResponse | None:
        context.request = request
        context._status = _CONTINUE
        direction = _direction(request)
        if direction == "read_data":
            context.bytes_read += len(request.read_data.data)
            context.read_closed = context.read_closed or request.read_data.end_of_stream
        elif direction == "write_data":
            context.bytes_written += len(request.write_data.data)
            context.write_closed = context.write_closed or request.write_data.end_of_stream
        if request.HasField("metadata"):
            context._metadata_proto = request.metadata
            context._metadata = None
        if self._custom_process is None:
            response = await self._dispatch(request, context)
        else:
            try:
                response = await self._custom_process(request, context)
                if response is None:
                    response = _passthrough(request, direction)
                elif not isinstance(response, npb.ProcessingResponse):
                    raise CalloutError(f"process() returned {type(response).__name__}; "
                                       "expected ProcessingResponse or None")
            except StreamAbort:
                raise
            except Exception:
                logger.exception("process() failed")
                response = self._on_error(request, direction)
        if response is None:
            return None
        if context._status != _CONTINUE and response.connection_status == _CONTINUE:
            response.connection_status = context._status  # type: ignore[assignment]
        if context._dynamic is not None:
            response.dynamic_metadata.MergeFrom(context._dynamic)
            context._dynamic = None
        return response

    async def _dispatch(self, request: npb.ProcessingRequest,
                        context: NetworkContext) -> npb.ProcessingResponse | None:
        direction = _direction(request)
        if direction is None:
            self._no_direction("network ProcessingRequest without read_data or "
                                   "write_data; ignoring it")
            return None
        chunk = getattr(request, direction)
        data = chunk.data
        callback = self._callbacks[direction]
        try:
            modified = False
            if callback is not None:
                result = await callback(data, chunk.end_of_stream, context)
                if result is not None:
                    data, modified = _unpack(result, direction)
            response = _Response(data_processing_status=(
                _Response.MODIFIED if modified else _Response.UNMODIFIED))
            out = getattr(response, direction)
            out.data = data
            out.end_of_stream = chunk.end_of_stream
            if self._should_close is not None:
                close = await self._should_close(chunk.data, modified, context)
                if not isinstance(close, bool):
                    raise CalloutError(
                        f"should_close_connection returned {type(close).__name__}; "
                        "expected bool")
                if close:
                    context.close_connection()
        except StreamAbort:
            raise
        except Exception:
            logger.exception("on_%s failed", direction)
            return self._on_error(request, direction)
        return response

    def _on_error(self, request: npb.ProcessingRequest,
                  direction: str | None) -> npb.ProcessingResponse:
        if self.error_policy is ErrorPolicy.ABORT or direction is None:
            raise StreamAbort(grpc.StatusCode.INTERNAL, "callout failed")
        if self.error_policy is ErrorPolicy.CONTINUE:
            return _passthrough(request, direction)
        return _Response(connection_status=_CLOSE)


def _direction(request: npb.ProcessingRequest) -> str | None:
    # read_data and write_data are two plain fields, not a oneof: tell them apart by presence.
    if request.HasField("read_data"):
        return "read_data"
    if request.HasField("write_data"):
        return "write_data"
    return None


def _passthrough(request: npb.ProcessingRequest, direction: str | None) -> npb.ProcessingResponse:
    response = _Response(data_processing_status=_Response.UNMODIFIED)
    if direction is not None:
        getattr(response, direction).CopyFrom(getattr(request, direction))
    return response


def _unpack(result: Any, direction: str) -> tuple[bytes, bool]:
    if isinstance(result, tuple) and len(result) == 2:
        data, modified = result
        if isinstance(data, bytes | bytearray | memoryview) and isinstance(modified, bool):
            return bytes(data), modified
    hint = ("; encode text first (text.encode())" if isinstance(result, str)
            or (isinstance(result, tuple) and result and isinstance(result[0], str)) else "")
    raise CalloutError(f"on_{direction} returned {_describe(result)}; expected None or "
                       f"ProcessingResult(processed_data: bytes, modified: bool){hint}")


def _describe(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(type(v).__name__ for v in value) + ")"
    return type(value).__name__
