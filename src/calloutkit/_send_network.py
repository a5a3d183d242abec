"""Push read/write chunks at a network (L4) callout server, as Envoy would.

Two clients share one description of a connection:

- `NetworkCalloutClient` drives a `NetworkCalloutServer` in process (no sockets, no Envoy),
  through the server's own stream handler.
- `send_chunks` (``calloutkit send --l4``) sends them over gRPC to a running server and prints
  each reply as a line of JSON.

A description is JSON or YAML, shaped like the L7 one of ``calloutkit send``: a list of
messages, or ``{"metadata": ..., "messages": [...]}``. Each message has exactly one of
``read_data`` / ``write_data`` (UTF-8 text; ``read`` / ``write`` for short) or
``read_base64`` / ``write_base64``, and optionally ``end_of_stream`` and ``metadata``
(``{namespace: {key: value}}``, the dynamic metadata Envoy forwards)::

    metadata: {tenant: {name: acme}}      # on every message, like forwarding_namespaces
    messages:
      - read_data: "GET user:42\\r\\n"
      - write_data: "$5\\r\\nalice\\r\\n"
      - read_data: ""
        end_of_stream: true
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, TextIO

import grpc
import yaml
from envoy.service.network_ext_proc.v3 import network_external_processor_pb2 as npb
from google.protobuf import json_format

from ._client import StreamEnded, _FakeContext
from ._config import format_address, parse_address
from ._exceptions import ConfigError
from ._network import SERVICE_NAME, NetworkCalloutServer

_METHOD = f"/{SERVICE_NAME}/Process"
_KEYS = {"read_data": ("read_data", False), "write_data": ("write_data", False),
         "read": ("read_data", False), "write": ("write_data", False),
         "read_base64": ("read_data", True), "write_base64": ("write_data", True)}
_STATUS = npb.ProcessingResponse


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


def parse_chunks(text: str, source: str = "<stdin>") -> list[npb.ProcessingRequest]:
    """Turn a JSON or YAML description into requests; `ConfigError` says what is wrong.

    >>> [r.HasField("read_data") for r in parse_chunks('[{"read_data": "a"}, {"write": "b"}]')]
    [True, False]
    """
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}:{where} not valid JSON or YAML: {problem}") from None
    shared: Any = None
    if isinstance(doc, dict):
        unknown = sorted(str(k) for k in set(doc) - {"metadata", "messages", "chunks"})
        if unknown:
            raise ConfigError(f"{source}: unknown key {unknown[0]!r} (expected metadata, "
                              "messages)")
        shared, doc = doc.get("metadata"), doc.get("messages", doc.get("chunks"))
    if not isinstance(doc, list) or not doc:
        raise ConfigError(f"{source}: expected a non-empty list of messages (or a mapping "
                          "with 'messages')")
    _check_metadata(shared, f"{source}: metadata")
    return [_chunk(item, shared, f"{source}: message {n}") for n, item in enumerate(doc, 1)]


def _chunk(item: Any, shared: Any, where: str) -> npb.ProcessingRequest:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a mapping like {{read_data: text}}, got "
                          f"{type(item).__name__}")
    data_keys = [k for k in item if k in _KEYS]
    if len(data_keys) != 1:
        raise ConfigError(f"{where}: needs exactly one of read_data, write_data, "
                          f"read_base64, write_base64 (got {', '.join(map(str, item)) or 'none'})")
    unknown = sorted(str(k) for k in item if k not in _KEYS
                     and k not in ("end_of_stream", "metadata"))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}")
    key = data_keys[0]
    field, encoded = _KEYS[key]
    value = item[key]
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string, got {type(value).__name__}")
    if encoded:
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{where}: {key} is not valid base64") from None
    else:
        data = value.encode()
    end = item.get("end_of_stream", False)
    if not isinstance(end, bool):
        raise ConfigError(f"{where}: end_of_stream must be true or false")
    metadata = item.get("metadata", shared)
    _check_metadata(metadata, f"{where}: metadata")
    return data_request(field.removesuffix("_data"), data, end, metadata)


def _check_metadata(metadata: Any, where: str) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) for k, v in metadata.items()):
        raise ConfigError(f"{where}: expected {{namespace: {{key: value}}}}")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def reply_to_dict(response: npb.ProcessingResponse) -> dict[str, Any]:
    """A reply as plain JSON-ready data: text stays text, other bytes become base64.

    >>> reply_to_dict(npb.ProcessingResponse())
    {'data_processing_status': 'UNKNOWN', 'connection_status': 'CONTINUE'}
    """
    out: dict[str, Any] = {}
    for field in ("read_data", "write_data"):
        if response.HasField(field):
            chunk = getattr(response, field)
            try:
                body: dict[str, Any] = {"data": chunk.data.decode()}
            except UnicodeDecodeError:
                body = {"data_base64": base64.b64encode(chunk.data).decode()}
            body["end_of_stream"] = chunk.end_of_stream
            out[field] = body
    out["data_processing_status"] = _STATUS.DataProcessedStatus.Name(
        response.data_processing_status)
    out["connection_status"] = _STATUS.ConnectionStatus.Name(response.connection_status)
    if response.HasField("dynamic_metadata"):
        out["dynamic_metadata"] = json_format.MessageToDict(response.dynamic_metadata)
    return out


class NetworkCalloutStream:
    """One TCP connection's stream against an in-process `NetworkCalloutServer`.

    ``read`` / ``write`` send one chunk and return the server's reply; `StreamEnded` is raised
    when the server ends the stream with a gRPC status instead.
    """

    def __init__(self, server: NetworkCalloutServer,
                 metadata: Sequence[tuple[str, str]]) -> None:
        self._server = server
        self._inbox: asyncio.Queue[npb.ProcessingRequest | None] = asyncio.Queue()
        self._outbox: asyncio.Queue[npb.ProcessingResponse | BaseException] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._run(_FakeContext(metadata)))

    async def _requests(self) -> AsyncIterator[npb.ProcessingRequest]:
        while (request := await self._inbox.get()) is not None:
            yield request

    async def _run(self, context: _FakeContext) -> None:
        try:
            async for response in self._server._stream(self._requests(), context):
                await self._outbox.put(response)
        except BaseException as exc:  # handed to the caller of send()
            await self._outbox.put(exc)
        else:
            await self._outbox.put(StreamEnded(grpc.StatusCode.OK, "stream ended"))

    async def send(self, request: npb.ProcessingRequest) -> npb.ProcessingResponse:
        """Send a raw `ProcessingRequest` and return the reply."""
        if not (request.HasField("read_data") or request.HasField("write_data")):
            raise ValueError("a network ProcessingRequest carries read_data or write_data")
        await self._inbox.put(request)
        item = await self._outbox.get()
        if isinstance(item, BaseException):
            raise item
        return item

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

    async def close(self) -> None:
        """Half-close the stream (the connection is over) and let the server finish."""
        await self._inbox.put(None)
        await asyncio.gather(self._task, return_exceptions=True)

    async def __aenter__(self) -> NetworkCalloutStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


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


async def send_chunks(target: str, requests: Sequence[npb.ProcessingRequest], *,
                      out: TextIO, err: TextIO, ca: str | None = None, tls: bool = False,
                      authority: str | None = None,
                      metadata: Sequence[tuple[str, str]] = (), timeout: float = 10.0) -> int:
    """Send ``requests`` on one stream, one at a time, printing each reply as JSON.

    Stops after a reply that closes or resets the connection, as Envoy would. Returns 0, or 1
    after printing the gRPC status and details to ``err``.
    """
    options = [("grpc.default_authority", authority)] if authority else []
    if tls or ca:
        roots = None
        if ca:
            try:
                with open(ca, "rb") as handle:
                    roots = handle.read()
            except OSError as exc:
                raise ConfigError(f"cannot read CA file {ca!r}: {exc.strerror or exc}") from None
        if authority:
            options.append(("grpc.ssl_target_name_override", authority))
        channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(roots), options)
    else:
        channel = grpc.aio.insecure_channel(target, options)
    async with channel:
        call = channel.stream_stream(
            _METHOD, request_serializer=npb.ProcessingRequest.SerializeToString,
            response_deserializer=npb.ProcessingResponse.FromString,
        )(metadata=tuple(metadata) or None, timeout=timeout)
        try:
            for request in requests:
                await call.write(request)
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    break
                print(json.dumps(reply_to_dict(reply)), file=out, flush=True)
                if reply.connection_status != _STATUS.CONTINUE:
                    break
            await call.done_writing()
            while (reply := await call.read()) is not grpc.aio.EOF:
                print(json.dumps(reply_to_dict(reply)), file=out, flush=True)
        except grpc.aio.AioRpcError as exc:
            print(f"calloutkit: error: gRPC {exc.code().name}: {exc.details() or ''}",
                  file=err, flush=True)
            return 1
    return 0


def read_source(path: str) -> tuple[str, str]:
    """The text of a description file (``-`` is stdin), and a name for error messages."""
    if path == "-":
        return sys.stdin.read(), "<stdin>"
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read(), path
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cannot read {path}: {reason}") from None


def _metadata_pair(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key.strip().lower(), val


def add_network_send_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of an L4 send: FILE, --address, --tls, --ca, --authority, --metadata,
    --timeout. (`calloutkit send --l4` and `calloutkit send-l4` share them.)"""
    parser.add_argument("--address", "--target", dest="address", default="127.0.0.1:8080",
                        metavar="HOST:PORT",
                        help="the callout server's gRPC address (default 127.0.0.1:8080)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--ca", metavar="PEM", help="CA certificate to verify the server "
                        "(implies --tls)")
    parser.add_argument("--authority", metavar="NAME",
                        help="authority / TLS server name to present")
    parser.add_argument("--metadata", "-H", dest="metadata", action="append", default=[],
                        type=_metadata_pair, metavar="KEY=VALUE",
                        help="gRPC metadata on the stream (repeatable)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="deadline for the whole stream (default 10)")


def run_network_send(args: argparse.Namespace) -> int:
    """Run an L4 send from parsed arguments (``file``, ``address``, ``tls``, ...)."""
    text, source = read_source(args.file)
    requests = parse_chunks(text, source)
    target = format_address(parse_address(args.address, "--address"))
    return asyncio.run(send_chunks(
        target, requests, out=sys.stdout, err=sys.stderr, ca=args.ca, tls=args.tls,
        authority=args.authority, metadata=args.metadata, timeout=args.timeout))


def add_parser(subparsers: Any) -> None:
    """Register ``calloutkit send-l4``."""
    parser = subparsers.add_parser(
        "send-l4", help="send read/write chunks to a network (L4) callout server",
        description="Send the chunks described in FILE (JSON or YAML; - for stdin) to a "
                    "NetworkCalloutServer on one stream, printing each reply as JSON.")
    parser.add_argument("file", metavar="FILE",
                        help="JSON or YAML description of the chunks; - reads stdin")
    add_network_send_arguments(parser)
    parser.set_defaults(func=run_network_send)
