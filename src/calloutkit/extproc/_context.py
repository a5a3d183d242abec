"""The per-stream context every ext_proc callback receives."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from ..runtime._errors import StreamAbort
from ..runtime._tls import PeerIdentity, peer_identity
from ._headers import Headers

if TYPE_CHECKING:
    from envoy.service.ext_proc.v3.external_processor_pb2 import (
        HttpHeaders,
        HttpTrailers,
        ProcessingRequest,
    )
    from google.protobuf import any_pb2, struct_pb2

# Slots the server sets as their messages arrive; read as None before (`__getattr__`).
_UNSET_IS_NONE = frozenset({"_request_start", "_response_start", "_request_trailers",
                            "_response_trailers"})

# The key of Envoy's own attributes in ProcessingRequest.attributes.
ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"


def plain(value: struct_pb2.Value) -> Any:
    """A protobuf `Value` as Python: dict, list, str, float (every Struct number), bool or
    None."""
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return plain_struct(value.struct_value)
    if kind == "list_value":
        return [plain(item) for item in value.list_value.values]
    if kind is None or kind == "null_value":
        return None
    return getattr(value, kind)


def plain_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A protobuf `Struct` as a dict of plain Python values (see `plain`)."""
    return {key: plain(item) for key, item in struct.fields.items()}


class CalloutContext:
    """What a callback knows about its stream, beyond the message it was handed.

    One context lives from the first message of a stream (the request headers) to the last
    (the end of the response). Attributes:

    - ``state``: your per-stream object (a `types.SimpleNamespace` unless `new_state` says
      otherwise); put anything there that a later phase needs.
    - ``request``: the whole `ProcessingRequest` being handled (attributes,
      ``metadata_context``, ``protocol_config``, ``observability_mode``).
    - ``request_headers`` / ``response_headers``: the headers seen so far on this stream
      (the `HttpHeaders` messages).
    - ``request_headers_map`` / ``response_headers_map`` / ``request_trailers_map`` /
      ``response_trailers_map``: the same as read-only, case-insensitive `Headers` of text
      values, on every phase (empty before they arrive).
    - ``attributes``: the attributes Envoy sends (``request_attributes`` /
      ``response_attributes`` in its config) as ``{"request.path": "/a", ...}``.
    - ``metadata``: the metadata Envoy forwards (``metadata_options.forwarding_namespaces``)
      as ``{namespace: {key: value}}``; ``typed_metadata`` the typed namespaces.
    - ``request_body_mode`` / ``response_body_mode``: the effective body modes, including any
      ``mode_override`` this server sent (Envoy does not repeat ``protocol_config``).

    Anything else (``invocation_metadata()``, ``peer()``, ...) is passed to the gRPC context.
    A callback may set attributes of its own (``context._seen = True``); they live as long as
    the stream.

    Example::

        def on_request_headers(self, headers, context):
            context.state.started = time.monotonic()
            tenant = context.metadata["my.namespace"]["tenant"]
            user_agent = context.request_headers_map.get("user-agent", "")
    """

    # The slots keep the attributes calloutkit sets on every stream fast; ``__dict__`` lets
    # a callback add its own (``context._my_state = ...``), as code written for a plain gRPC
    # context does. The dict is only made when the first such attribute is set.
    #
    # The readable accessors (``*_map``, ``attributes``, ``metadata``) cost nothing until a
    # callback reads one: a stream only keeps references to the messages it was handed (one
    # store per headers or trailers message); the conversion happens on the first read and
    # is kept, with the message it came from, in ``__dict__`` under ``_ck_*`` keys, so that a
    # stream that never reads them never makes the dict.
    __slots__ = ("__dict__", "_grpc", "_request_start", "_request_trailers", "_response_start",
                 "_response_trailers", "_strip_response_length", "request",
                 "request_body_mode", "request_headers", "response_body_mode",
                 "response_headers", "state")

    # Types of the slots left unset until their message arrives (see __init__).
    _request_start: ProcessingRequest | None
    _response_start: ProcessingRequest | None
    _request_trailers: HttpTrailers | None
    _response_trailers: HttpTrailers | None

    def __init__(self, grpc_context: Any, state: Any = None) -> None:
        self._grpc = grpc_context
        self.state: Any = types.SimpleNamespace() if state is None else state
        self.request: ProcessingRequest | None = None
        self.request_headers: HttpHeaders | None = None
        self.response_headers: HttpHeaders | None = None
        self.request_body_mode = 0
        self.response_body_mode = 0
        self._strip_response_length = False
        # _request_start / _response_start (the ProcessingRequests that carried each
        # direction's headers, and so its attributes) and the trailers are set when those
        # messages arrive and left unset until then: `__getattr__` reads an unset one as
        # None, so a stream does not pay for storing four Nones it may never read.

    def _cached(self, key: str, sources: tuple[Any, ...],
                build: Callable[[], Any]) -> Any:
        """``build()``, made once per set of source messages (compared by identity)."""
        cache = self.__dict__
        hit = cache.get(key)
        if hit is not None and len(hit[0]) == len(sources) and all(
                a is b for a, b in zip(hit[0], sources, strict=True)):
            return hit[1]
        value = build()
        cache[key] = (sources, value)
        return value

    @property
    def request_headers_map(self) -> Headers:
        """The request headers as `Headers` (case-insensitive, text values), on every phase
        from the request headers on; empty before them, or when Envoy does not send them."""
        source = self.request_headers
        return self._cached("_ck_request_headers", (source,),  # type: ignore[no-any-return]
                            lambda: Headers(source))

    @property
    def response_headers_map(self) -> Headers:
        """The response headers as `Headers`, from the response headers phase on."""
        source = self.response_headers
        return self._cached("_ck_response_headers", (source,),  # type: ignore[no-any-return]
                            lambda: Headers(source))

    @property
    def request_trailers_map(self) -> Headers:
        """The request trailers as `Headers`, once they arrived (``request_trailer_mode:
        SEND``)."""
        source = self._request_trailers
        return self._cached("_ck_request_trailers", (source,),  # type: ignore[no-any-return]
                            lambda: Headers(source))

    @property
    def response_trailers_map(self) -> Headers:
        """The response trailers as `Headers`, once they arrived (``response_trailer_mode:
        SEND``)."""
        source = self._response_trailers
        return self._cached("_ck_response_trailers", (source,),  # type: ignore[no-any-return]
                            lambda: Headers(source))

    @property
    def attributes(self) -> dict[str, Any]:
        """Envoy's attributes for this request as ``{name: value}``, e.g.
        ``{"request.path": "/a?b=1", "source.address": "10.0.0.1:52000",
        "response.code": 200.0}``.

        Envoy sends the filter's ``request_attributes`` with the request headers and its
        ``response_attributes`` with the response headers; this merges what the stream has
        seen so far (and any the current message carries). Values as Envoy sends them: every
        number is a float, map-valued attributes (``request.headers``) arrive as the string
        ``"CelMap value"``. Empty when none are configured. The raw Structs stay in
        ``context.request.attributes``.
        """
        sources = (self._request_start, self._response_start, self.request)
        return self._cached("_ck_attributes", sources,  # type: ignore[no-any-return]
                            lambda: _merged_attributes(sources))

    @property
    def metadata(self) -> dict[str, dict[str, Any]]:
        """The filter metadata Envoy forwards, as ``{namespace: {key: value}}``.

        Envoy sends the namespaces listed in the filter's
        ``metadata_options.forwarding_namespaces.untyped`` with every message, read here from
        the message being handled. Values are plain Python (numbers are floats). Empty when
        none are forwarded.
        """
        request = self.request
        return self._cached("_ck_metadata", (request,),  # type: ignore[no-any-return]
                            lambda: {} if request is None else {
                                namespace: plain_struct(struct) for namespace, struct in
                                request.metadata_context.filter_metadata.items()})

    @property
    def typed_metadata(self) -> dict[str, any_pb2.Any]:
        """The typed filter metadata Envoy forwards
        (``metadata_options.forwarding_namespaces.typed``), as ``{namespace: Any}``: unpack
        each into its message type (``value.Unpack(message)``)."""
        request = self.request
        if request is None:
            return {}
        return dict(request.metadata_context.typed_filter_metadata)

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
        # Only reached for a name that is neither set nor a class attribute.
        if name in _UNSET_IS_NONE:
            return None
        return getattr(self._grpc, name)


def _merged_attributes(requests: tuple[ProcessingRequest | None, ...]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for request in requests:
        if request is not None and ATTRIBUTES_KEY in request.attributes:
            merged.update(plain_struct(request.attributes[ATTRIBUTES_KEY]))
    return merged
