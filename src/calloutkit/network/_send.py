"""``calloutkit send --l4``: push read/write chunks at a running network (L4) callout server,
as Envoy would, and print each reply as a line of JSON. `NetworkCalloutClient` (in `_client`)
plays the same descriptions in process.

A description is JSON or YAML, shaped like the L7 one of ``calloutkit send``: a list of
messages, or ``{"metadata": ..., "messages": [...]}``. Each message has exactly one of
``read_data`` / ``write_data`` (``read`` / ``write`` for short): text, or ``{base64: ...}``
for bytes; and optionally ``end_of_stream`` and ``metadata`` (``{namespace: {key: value}}``,
the dynamic metadata Envoy forwards)::

    metadata: {tenant: {name: acme}}      # on every message, like forwarding_namespaces
    messages:
      - read_data: "GET user:42\\r\\n"
      - write_data: {base64: JDUNCmFsaWNlDQo=}    # "$5\\r\\nalice\\r\\n"
      - read_data: ""
        end_of_stream: true
"""

from __future__ import annotations

import argparse
import base64
import json
from collections.abc import Sequence
from typing import Any, TextIO

from envoy.service.network_ext_proc.v3 import network_external_processor_pb2 as npb
from google.protobuf import json_format

from ..client._play import (
    body_bytes,
    check_namespaces,
    load_document,
    play,
    run_described,
)
from ..runtime._errors import ConfigError
from ._client import data_request
from ._server import SERVICE_NAME

_METHOD = f"/{SERVICE_NAME}/Process"
_KEYS = {"read_data": "read", "write_data": "write", "read": "read", "write": "write"}
_STATUS = npb.ProcessingResponse


def parse_chunks(text: str, source: str = "<stdin>") -> list[npb.ProcessingRequest]:
    """Turn a JSON or YAML description into requests; `ConfigError` says what is wrong.

    >>> [r.HasField("read_data") for r in parse_chunks('[{"read_data": "a"}, {"write": "b"}]')]
    [True, False]
    """
    doc = load_document(text, source)
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
    if shared is not None:
        check_namespaces(shared, f"{source}: metadata")
    return [_chunk(item, shared, f"{source}: message {n}") for n, item in enumerate(doc, 1)]


def _chunk(item: Any, shared: Any, where: str) -> npb.ProcessingRequest:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a mapping like {{read_data: text}}, got "
                          f"{type(item).__name__}")
    data_keys = [k for k in item if k in _KEYS]
    if len(data_keys) != 1:
        others = [str(k) for k in item if k not in ("end_of_stream", "metadata")]
        raise ConfigError(f"{where}: needs exactly one of read_data, write_data (got "
                          f"{', '.join(others) or 'none'})")
    unknown = sorted(str(k) for k in item if k not in _KEYS
                     and k not in ("end_of_stream", "metadata"))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}")
    key = data_keys[0]
    data = body_bytes(item[key], f"{where}: {key}")
    end = item.get("end_of_stream", False)
    if not isinstance(end, bool):
        raise ConfigError(f"{where}: end_of_stream must be true or false")
    metadata = item.get("metadata", shared)
    if metadata is not None:
        check_namespaces(metadata, f"{where}: metadata")
    return data_request(_KEYS[key], data, end, metadata)


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


async def send_chunks(target: str, requests: Sequence[npb.ProcessingRequest], *,
                      out: TextIO, err: TextIO, tls: bool = False, ca: str | None = None,
                      authority: str | None = None, metadata: Sequence[tuple[str, str]] = (),
                      timeout: float = 10.0, proto_json: bool = False,
                      indent: int | None = None) -> int:
    """Send ``requests`` on one stream, each after the previous reply, printing each reply.

    Stops after a reply that closes or resets the connection, as Envoy would. Returns 0, or 1
    after printing the gRPC status and details to ``err``.
    """
    def show(reply: npb.ProcessingResponse) -> None:
        data = (json_format.MessageToDict(reply, preserving_proto_field_name=True)
                if proto_json else reply_to_dict(reply))
        print(json.dumps(data, indent=indent), file=out, flush=True)

    return await play(
        target, _METHOD, npb.ProcessingRequest, npb.ProcessingResponse, requests, show=show,
        # a reply that closes or resets the connection: Envoy sends nothing more
        last_reply=lambda reply: reply.connection_status != _STATUS.CONTINUE,
        unanswered="Envoy drops that chunk and stops processing the connection", err=err,
        tls=tls, ca=ca, authority=authority, metadata=metadata, timeout=timeout)


def run_network_send(args: argparse.Namespace) -> int:
    """``calloutkit send --l4``: parse the description in ``args.file``, then send it."""
    return run_described(args, parse_chunks, send_chunks, proto_json=args.proto_json)
