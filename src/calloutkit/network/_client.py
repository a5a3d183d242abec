"""`NetworkCalloutClient`: drive a `NetworkCalloutServer` in process, chunk by chunk, with no
sockets, through the server's own stream handler.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from envoy.service.network_ext_proc.v3 import network_external_processor_pb2 as npb
from google.protobuf import json_format

from ..client._inprocess import InProcessStream
from ._server import NetworkCalloutServer


def data_request(direction: str, data: bytes | str, end_of_stream: bool = False,
                 metadata: Mapping[str, Mapping[str, Any]] | None = None,
                 ) -> npb.ProcessingRequest:
    """A `ProcessingRequest` as Envoy sends it; ``direction`` is ``"read"`` or ``"write"``.

    >>> data_request("read", "hi").read_data.data
    b'hi'
    """
    if direction not in ("read", "write"):
        raise ValueError(f"direction must be 'read' or 'write', not {direction!r}")
    request = npb.ProcessingRequest()
    chunk = getattr(request, f"{direction}_data")
    chunk.data = data.encode() if isinstance(data, str) else bytes(data)
    chunk.end_of_stream = end_of_stream
    for namespace, values in (metadata or {}).items():
        json_format.ParseDict(dict(values), request.metadata.filter_metadata[namespace])
    return request


class NetworkCalloutStream(InProcessStream):
    """One TCP connection's stream against an in-process `NetworkCalloutServer`.

    ``read`` / ``write`` send one chunk and return the server's reply; `StreamEnded` is raised
    when the server ends the stream with a gRPC status instead.
    """

    def __init__(self, server: NetworkCalloutServer,
                 metadata: Sequence[tuple[str, str]]) -> None:
        super().__init__(server, metadata)

    async def send(self, request: npb.ProcessingRequest) -> npb.ProcessingResponse:
        """Send a raw `ProcessingRequest` and return the reply."""
        if not (request.HasField("read_data") or request.HasField("write_data")):
            raise ValueError("a network ProcessingRequest carries read_data or write_data")
        # The server's stream yields each reply serialized, as it goes on the wire.
        return npb.ProcessingResponse.FromString(await self._exchange(request))

    async def read(self, data: bytes | str, end_of_stream: bool = False,
                   metadata: Mapping[str, Mapping[str, Any]] | None = None,
                   ) -> npb.ProcessingResponse:
        """Send client-to-upstream bytes (``read_data``)."""
        return await self.send(data_request("read", data, end_of_stream, metadata))

    async def write(self, data: bytes | str, end_of_stream: bool = False,
                    metadata: Mapping[str, Mapping[str, Any]] | None = None,
                    ) -> npb.ProcessingResponse:
        """Send upstream-to-client bytes (``write_data``)."""
        return await self.send(data_request("write", data, end_of_stream, metadata))


class NetworkCalloutClient:
    """Test a `NetworkCalloutServer` subclass without Envoy or sockets.

    Example::

        async def test_upper():
            client = NetworkCalloutClient(Upper(plaintext_address=("127.0.0.1", 0),
                                                disable_tls=True, combined_health_check=True))
            async with client.stream() as connection:
                reply = await connection.read(b"hello")
                assert reply.read_data.data == b"HELLO"
    """

    def __init__(self, server: NetworkCalloutServer,
                 metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.server = server
        self._metadata = metadata

    def stream(self) -> NetworkCalloutStream:
        """Open a new stream (one TCP connection); use it as ``async with``."""
        return NetworkCalloutStream(self.server, self._metadata)
