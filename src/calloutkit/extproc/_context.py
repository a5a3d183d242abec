"""The per-stream context every ext_proc callback receives."""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from ..runtime._errors import StreamAbort
from ..runtime._tls import PeerIdentity, peer_identity

if TYPE_CHECKING:
    from envoy.service.ext_proc.v3.external_processor_pb2 import HttpHeaders, ProcessingRequest




class CalloutContext:
    """What a callback knows about its stream, beyond the message it was handed.

    One context lives from the first message of a stream (the request headers) to the last
    (the end of the response). Attributes:

    - ``state``: your per-stream object (a `types.SimpleNamespace` unless `new_state` says
      otherwise); put anything there that a later phase needs.
    - ``request``: the whole `ProcessingRequest` being handled (attributes,
      ``metadata_context``, ``protocol_config``, ``observability_mode``).
    - ``request_headers`` / ``response_headers``: the headers seen so far on this stream.
    - ``request_body_mode`` / ``response_body_mode``: the effective body modes, including any
      ``mode_override`` this server sent (Envoy does not repeat ``protocol_config``).

    Anything else (``invocation_metadata()``, ``peer()``, ...) is passed to the gRPC context.
    A callback may set attributes of its own (``context._seen = True``); they live as long as
    the stream.

    Example::

        def on_request_headers(self, headers, context):
            context.state.started = time.monotonic()
            tenant = context.request.metadata_context.filter_metadata["tenant"]
    """

    # The slots keep the attributes calloutkit sets on every stream fast; ``__dict__`` lets
    # a callback add its own (``context._my_state = ...``), as code written for a plain gRPC
    # context does. The dict is only made when the first such attribute is set.
    __slots__ = ("__dict__", "_grpc", "_strip_response_length", "request",
                 "request_body_mode", "request_headers", "response_body_mode",
                 "response_headers", "state")

    def __init__(self, grpc_context: Any, state: Any = None) -> None:
        self._grpc = grpc_context
        self.state: Any = types.SimpleNamespace() if state is None else state
        self.request: ProcessingRequest | None = None
        self.request_headers: HttpHeaders | None = None
        self.response_headers: HttpHeaders | None = None
        self.request_body_mode = 0
        self.response_body_mode = 0
        self._strip_response_length = False

    @property
    def grpc_context(self) -> Any:
        """The underlying `grpc.aio.ServicerContext` (None in `calloutkit.testing`)."""
        return self._grpc

    @property
    def peer_identity(self) -> PeerIdentity | None:
        """The client certificate the peer (Envoy) presented, on a TLS listener with
        ``client_ca_path``; None on plaintext or without one. See `PeerIdentity`."""
        return peer_identity(self._grpc)

    def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        """End the stream now with a gRPC status; Envoy then applies its failure policy.

        Works from ``def`` and ``async def`` callbacks alike (it raises, so ``await`` is not
        needed, and harmless)::

            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no entry")
        """
        raise StreamAbort(code, details)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grpc, name)
