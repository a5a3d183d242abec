"""`CalloutClient`: drive a `CalloutServer` in process, phase by phase, with no sockets.

The server's own stream handler runs exactly as under Envoy (same dispatch, same reply shaping,
same error policy); only the transport is replaced by two in-memory queues.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format

from ..client._inprocess import InProcessStream
from ._server import CalloutServer

HeaderInput = Mapping[str, str | bytes] | Iterable[tuple[str, str | bytes]]
_Mode = processing_mode_pb2.ProcessingMode


def header_map(headers: HeaderInput) -> base_pb2.HeaderMap:
    """A `HeaderMap` (values in ``raw_value``, as Envoy sends them)."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    out = base_pb2.HeaderMap()
    for key, value in items:
        out.headers.add(key=key.lower(),
                        raw_value=value if isinstance(value, bytes) else str(value).encode())
    return out


def http_headers(headers: HeaderInput, end_of_stream: bool = False) -> pb.HttpHeaders:
    """Build `HttpHeaders` as Envoy sends them.

    >>> http_headers({":path": "/", ":method": "GET"}, end_of_stream=True).end_of_stream
    True
    """
    return pb.HttpHeaders(headers=header_map(headers), end_of_stream=end_of_stream)


def http_body(body: bytes | str, end_of_stream: bool = True) -> pb.HttpBody:
    """Build an `HttpBody` chunk.

    >>> http_body("hi").body
    b'hi'
    """
    return pb.HttpBody(body=body.encode() if isinstance(body, str) else body,
                       end_of_stream=end_of_stream)


def http_trailers(trailers: HeaderInput) -> pb.HttpTrailers:
    """Build `HttpTrailers`."""
    return pb.HttpTrailers(trailers=header_map(trailers))


def header_changes(response: pb.ProcessingResponse) -> dict[str, str]:
    """The headers a reply sets, as ``{lower-case name: value}``, whichever phase it answers.

    Names are lower-cased as Envoy does on the wire: a reply built with ``"X-Seen"`` and one
    built with ``"x-seen"`` change the same header.

    >>> header_changes(pb.ProcessingResponse())
    {}
    """
    mutation = _mutation(response)
    if mutation is None:
        return {}
    return {o.header.key.lower(): o.header.raw_value.decode("utf-8", "replace")
            for o in mutation.set_headers}


def header_removals(response: pb.ProcessingResponse) -> list[str]:
    """The header names a reply removes, lower-cased as Envoy does."""
    mutation = _mutation(response)
    return [k.lower() for k in mutation.remove_headers] if mutation is not None else []


def _mutation(response: pb.ProcessingResponse) -> Any:
    which = response.WhichOneof("response")
    if which is None:
        return None
    payload = getattr(response, which)
    if which == "immediate_response":
        return payload.headers
    if which.endswith("_trailers"):
        return payload.header_mutation
    return payload.response.header_mutation


def _attach(request: pb.ProcessingRequest, attributes: Mapping[str, Mapping[str, Any]] | None,
            metadata: Mapping[str, Mapping[str, Any]] | None) -> pb.ProcessingRequest:
    for name, values in (attributes or {}).items():
        json_format.ParseDict(dict(values), request.attributes[name])
    for namespace, values in (metadata or {}).items():
        json_format.ParseDict(dict(values), request.metadata_context.filter_metadata[namespace])
    return request


class CalloutStream(InProcessStream):
    """One ext_proc stream (one HTTP request) against an in-process server.

    Each phase method sends one message and returns the server's reply (in observability
    mode too, though Envoy ignores it then; None only when a `process` override returned
    None). Raises `StreamEnded` when the server ends the stream with a status.
    """

    def __init__(self, server: CalloutServer, config: pb.ProtocolConfiguration,
                 observability: bool, metadata: Sequence[tuple[str, str]]) -> None:
        super().__init__(server, metadata)
        self._config = config
        self._observability = observability
        self._first = True

    async def send(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse | None:
        """Send a raw `ProcessingRequest`; protocol_config is added to the first one."""
        if self._first:
            self._first = False
            if not request.HasField("protocol_config"):
                request.protocol_config.CopyFrom(self._config)
        if self._observability:
            request.observability_mode = True
        response = await self._exchange(request, expect_reply=False)
        # The server's stream yields each reply serialized, as it goes on the wire.
        return None if response is None else pb.ProcessingResponse.FromString(response)

    async def request_headers(self, headers: HeaderInput, end_of_stream: bool = False,
                              attributes: Mapping[str, Mapping[str, Any]] | None = None,
                              metadata: Mapping[str, Mapping[str, Any]] | None = None,
                              ) -> pb.ProcessingResponse | None:
        """Send request headers (``attributes`` and ``metadata`` as Envoy would attach them)."""
        request = pb.ProcessingRequest(request_headers=http_headers(headers, end_of_stream))
        return await self.send(_attach(request, attributes, metadata))

    async def response_headers(self, headers: HeaderInput, end_of_stream: bool = False,
                               attributes: Mapping[str, Mapping[str, Any]] | None = None,
                               metadata: Mapping[str, Mapping[str, Any]] | None = None,
                               ) -> pb.ProcessingResponse | None:
        """Send response headers (``attributes`` and ``metadata`` as Envoy would attach
        them: ``{"envoy.filters.http.ext_proc": {"response.code": 200}}``)."""
        request = pb.ProcessingRequest(response_headers=http_headers(headers, end_of_stream))
        return await self.send(_attach(request, attributes, metadata))

    async def request_body(self, body: bytes | str,
                           end_of_stream: bool = True) -> pb.ProcessingResponse | None:
        """Send a request body chunk."""
        return await self.send(pb.ProcessingRequest(request_body=http_body(body, end_of_stream)))

    async def response_body(self, body: bytes | str,
                            end_of_stream: bool = True) -> pb.ProcessingResponse | None:
        """Send a response body chunk."""
        return await self.send(pb.ProcessingRequest(
            response_body=http_body(body, end_of_stream)))

    async def request_trailers(self, trailers: HeaderInput) -> pb.ProcessingResponse | None:
        """Send request trailers."""
        return await self.send(pb.ProcessingRequest(request_trailers=http_trailers(trailers)))

    async def response_trailers(self, trailers: HeaderInput) -> pb.ProcessingResponse | None:
        """Send response trailers."""
        return await self.send(pb.ProcessingRequest(response_trailers=http_trailers(trailers)))

class CalloutClient:
    """Test a `CalloutServer` subclass without Envoy or sockets.

    Example::

        async def test_adds_header():
            client = CalloutClient(MyServer(plaintext_address=("127.0.0.1", 0),
                                            disable_tls=True, combined_health_check=True),
                                   request_body_mode="BUFFERED")
            async with client.stream() as stream:
                reply = await stream.request_headers({":path": "/", ":method": "POST"})
                assert header_changes(reply) == {"x-seen": "1"}
                reply = await stream.request_body(b"hello")
    """

    def __init__(self, server: CalloutServer, *, request_body_mode: str | int = "NONE",
                 response_body_mode: str | int = "NONE", observability_mode: bool = False,
                 metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.server = server
        self._config = pb.ProtocolConfiguration(
            request_body_mode=_body_mode(request_body_mode),  # type: ignore[arg-type]
            response_body_mode=_body_mode(response_body_mode))  # type: ignore[arg-type]
        self._observability = observability_mode
        self._metadata = metadata

    def stream(self) -> CalloutStream:
        """Open a new stream (one HTTP request); use it as ``async with``."""
        return CalloutStream(self.server, self._config, self._observability, self._metadata)


def _body_mode(mode: str | int) -> int:
    return int(_Mode.BodySendMode.Value(mode.upper())) if isinstance(mode, str) else int(mode)
