"""``calloutkit send``: play one HTTP request's ext_proc stream against a running server.

It reads a description of the stream (JSON or YAML, from a file or stdin), sends it as Envoy
would, one message at a time, each after the previous reply, and prints every reply as JSON.
That is enough to try a callout without Envoy, from a shell or a CI job::

    protocol_config: {request_body_mode: BUFFERED}     # optional; sent on the first message
    metadata: {my.namespace: {tenant: acme}}            # optional; on every message
    messages:
      - request_headers: {":method": POST, ":path": /upload, content-type: text/plain}
      - request_body: hello world
      - response_headers: {":status": "200"}

Each message names one phase: ``request_headers``, ``request_body``, ``request_trailers``,
``response_headers``, ``response_body``, ``response_trailers``. Headers and trailers are a
mapping (or a list of ``[name, value]`` pairs, for repeated names); a body is text, or
``{base64: ...}`` for bytes. ``end_of_stream`` is worked out as Envoy sets it (set it on the
message to override); ``protocol_config``'s body modes default to NONE, BUFFERED or STREAMED
by the number of body messages in each direction. ``{processing_request: {...}}`` sends a
raw `ProcessingRequest` in protobuf JSON.

The parsing (`parse_stream`) and the sending (`send_stream`) are separate so that other
stream kinds can reuse the command.
"""

from __future__ import annotations

import argparse
import base64
import difflib
import json
from collections.abc import Sequence
from typing import Any, TextIO

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format

from ..client._play import (
    body_bytes,
    check_namespaces,
    kind_of,
    load_document,
    play,
    run_described,
)
from ..runtime._errors import ConfigError
from ._server import SERVICE_NAME

_METHOD = f"/{SERVICE_NAME}/Process"
_HEADER_PHASES = ("request_headers", "response_headers")
_BODY_PHASES = ("request_body", "response_body")
_TRAILER_PHASES = ("request_trailers", "response_trailers")
PHASES = (*_HEADER_PHASES, *_BODY_PHASES, *_TRAILER_PHASES)
_TOP_KEYS = ("messages", "protocol_config", "metadata", "attributes", "observability_mode")
# Keys of a network (L4) description (see _send_network), recognised here to point at --l4.
_L4_KEYS = ("read_data", "write_data", "read", "write", "chunks")
_Mode = processing_mode_pb2.ProcessingMode


class StreamDescription:
    """The messages of one described stream, ready to send."""

    def __init__(self, requests: list[pb.ProcessingRequest], observability_mode: bool) -> None:
        self.requests = requests
        self.observability_mode = observability_mode


def parse_stream(text: str, source: str = "<stdin>") -> StreamDescription:
    """Turn a stream description into `ProcessingRequest`s; `ConfigError` says what is wrong.

    >>> d = parse_stream('[{"request_headers": {":path": "/"}}]')
    >>> d.requests[0].request_headers.end_of_stream
    True
    """
    doc = load_document(text, source)
    if isinstance(doc, list):
        doc = {"messages": doc}
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a list of messages or a mapping with "
                          f"'messages', got {kind_of(doc)}")
    unknown = [str(k) for k in doc if k not in _TOP_KEYS]
    if unknown and unknown[0] in _L4_KEYS:
        raise _l4_error(source, f"{unknown[0]!r} belongs to a network (L4) description")
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r} (expected one of "
                          f"{', '.join(_TOP_KEYS)})")
    items = doc.get("messages")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{source}: 'messages' must be a non-empty list")
    observability = doc.get("observability_mode", False)
    if not isinstance(observability, bool):
        raise ConfigError(f"{source}: observability_mode must be true or false")

    phases = [_phase_of(item, f"{source}: messages[{n}]") for n, item in enumerate(items)]
    requests = [_message(item, phase, phases, n, f"{source}: messages[{n}]")
                for n, (item, phase) in enumerate(zip(items, phases, strict=True))]
    first = requests[0]
    if not first.HasField("protocol_config"):
        first.protocol_config.CopyFrom(
            _protocol_config(doc.get("protocol_config"), phases, source))
    metadata = doc.get("metadata")
    if metadata is not None:
        check_namespaces(metadata, f"{source}: metadata")
        for request in requests:
            for namespace, values in metadata.items():
                json_format.ParseDict(values, request.metadata_context.filter_metadata[namespace])
    attributes = doc.get("attributes")
    if attributes is not None:
        check_namespaces(attributes, f"{source}: attributes")
        for name, values in attributes.items():
            json_format.ParseDict(values, first.attributes[name])
    for request in requests:
        request.observability_mode = observability
    return StreamDescription(requests, observability)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _phase_of(item: Any, where: str) -> str:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a mapping like {{request_headers: ...}}, got "
                          f"{kind_of(item)}")
    if "processing_request" in item:
        return "processing_request"
    named = [k for k in item if k in PHASES]
    l4 = [str(k) for k in item if k in _L4_KEYS]
    if l4 and not named:
        raise _l4_error(where, f"{l4[0]} is a network (L4) message")
    if len(named) != 1:
        others = [str(k) for k in item if k != "end_of_stream"]
        hint = difflib.get_close_matches(others[0], PHASES, n=1) if len(others) == 1 else []
        suggestion = f" (did you mean {hint[0]}?)" if hint else ""
        raise ConfigError(f"{where}: needs exactly one phase ({', '.join(PHASES)}), got "
                          f"{', '.join(others) or 'none'}{suggestion}")
    return str(named[0])


def _l4_error(where: str, what: str) -> ConfigError:
    return ConfigError(f"{where}: {what}; send it with --l4 (calloutkit send --l4 FILE)")


def _message(item: dict[str, Any], phase: str, phases: Sequence[str], index: int,
             where: str) -> pb.ProcessingRequest:
    allowed = {phase, "end_of_stream"} if phase != "processing_request" else {phase}
    extra = [str(k) for k in item if k not in allowed]
    if extra:
        raise ConfigError(f"{where}: unknown key {extra[0]!r} beside {phase}")
    if phase == "processing_request":
        try:
            return json_format.ParseDict(item[phase], pb.ProcessingRequest())
        except (json_format.ParseError, AttributeError, TypeError) as exc:
            raise ConfigError(f"{where}: processing_request: {_one_line(exc)}") from None
    end = item.get("end_of_stream")
    if end is not None and not isinstance(end, bool):
        raise ConfigError(f"{where}: end_of_stream must be true or false")
    if end is None:
        end = _ends_stream(phase, phases, index)
    request = pb.ProcessingRequest()
    value = item[phase]
    if phase in _BODY_PHASES:
        getattr(request, phase).CopyFrom(pb.HttpBody(body=body_bytes(value, f"{where}.{phase}"),
                                                     end_of_stream=end))
    elif phase in _HEADER_PHASES:
        getattr(request, phase).CopyFrom(pb.HttpHeaders(
            headers=_header_map(value, f"{where}.{phase}"), end_of_stream=end))
    else:
        if item.get("end_of_stream") is not None:
            raise ConfigError(f"{where}: trailers always end the stream; drop end_of_stream")
        getattr(request, phase).CopyFrom(pb.HttpTrailers(
            trailers=_header_map(value, f"{where}.{phase}")))
    return request


def _ends_stream(phase: str, phases: Sequence[str], index: int) -> bool:
    """What Envoy puts in end_of_stream: true when nothing more follows in this direction
    (no body chunk and no trailers after these headers or this chunk)."""
    direction = phase.split("_")[0]
    return not any(p.startswith(direction) for p in phases[index + 1:])


def _header_map(value: Any, where: str) -> base_pb2.HeaderMap:
    if value is None:
        value = {}
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
        pairs = [(p[0], p[1]) for p in value]
    else:
        raise ConfigError(f"{where}: expected a mapping of name: value (or a list of "
                          "[name, value] pairs)")
    out = base_pb2.HeaderMap()
    for name, text in pairs:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: header name {name!r} is not a non-empty string")
        if isinstance(text, bool) or not isinstance(text, (str, int, float)):
            raise ConfigError(f"{where}: value of {name!r} must be text or a number, got "
                              f"{kind_of(text)}")
        out.headers.add(key=name.lower(), raw_value=str(text).encode())
    return out


def _protocol_config(value: Any, phases: Sequence[str],
                     source: str) -> pb.ProtocolConfiguration:
    config = pb.ProtocolConfiguration()
    for direction in ("request", "response"):
        chunks = sum(1 for p in phases if p == f"{direction}_body")
        mode = _Mode.NONE if chunks == 0 else _Mode.BUFFERED if chunks == 1 else _Mode.STREAMED
        setattr(config, f"{direction}_body_mode", mode)
    if value is None:
        return config
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: protocol_config must be a mapping, got {kind_of(value)}")
    try:
        json_format.ParseDict(value, config)
    except json_format.ParseError as exc:
        raise ConfigError(f"{source}: protocol_config: {_one_line(exc)}") from None
    return config


# -- printing ------------------------------------------------------------------------------

def reply_to_dict(response: pb.ProcessingResponse, proto_json: bool = False) -> dict[str, Any]:
    """A reply as JSON-ready data, with Envoy's field names.

    By default bytes read as text: a header's ``raw_value`` is shown as its ``value``, a
    ``body`` as text (``body_base64`` when it is not UTF-8). ``proto_json`` keeps the exact
    protobuf JSON mapping (bytes in base64).

    >>> reply_to_dict(pb.ProcessingResponse(request_headers=pb.HeadersResponse()))
    {'request_headers': {}}
    """
    data: dict[str, Any] = json_format.MessageToDict(response, preserving_proto_field_name=True)
    if not proto_json:
        data = _readable(data)
    return data


def _readable(value: Any) -> Any:
    if isinstance(value, list):
        return [_readable(v) for v in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key in ("raw_value", "body") and isinstance(item, str):
            raw = base64.b64decode(item)
            try:
                out["value" if key == "raw_value" else "body"] = raw.decode()
            except UnicodeDecodeError:
                out[f"{key}_base64" if key == "body" else key] = item
        else:
            out[key] = _readable(item)
    return out


# -- sending -------------------------------------------------------------------------------


async def send_stream(target: str, description: StreamDescription, *, out: TextIO,
                      err: TextIO, tls: bool = False, ca: str | None = None,
                      authority: str | None = None, metadata: Sequence[tuple[str, str]] = (),
                      timeout: float = 10.0, proto_json: bool = False,
                      indent: int | None = None) -> int:
    """Send the described stream, each message after the previous reply, as Envoy does.

    Prints each reply as JSON to ``out``. Stops early, as Envoy would, after an
    ImmediateResponse or when the server ends the stream. Returns 0, or 1 after printing the
    gRPC status and details to ``err``.
    """
    def show(reply: pb.ProcessingResponse) -> None:
        print(json.dumps(reply_to_dict(reply, proto_json), indent=indent), file=out, flush=True)

    return await play(
        target, _METHOD, pb.ProcessingRequest, pb.ProcessingResponse, description.requests,
        show=show,
        # after an ImmediateResponse Envoy answers the client and sends nothing more
        last_reply=lambda reply: reply.WhichOneof("response") == "immediate_response",
        unanswered="Envoy lets the request continue unmodified", err=err,
        # Envoy does not wait for answers in observability mode
        wait_for_replies=not description.observability_mode,
        tls=tls, ca=ca, authority=authority, metadata=metadata, timeout=timeout)


# -- the command ---------------------------------------------------------------------------


def run_send(args: argparse.Namespace) -> int:
    """``calloutkit send``: parse the L7 description in ``args.file``, then send it."""
    return run_described(args, parse_stream, send_stream, proto_json=args.proto_json)
