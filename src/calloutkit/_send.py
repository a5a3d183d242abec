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
import asyncio
import base64
import binascii
import difflib
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TextIO

import grpc
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format

from ._config import format_address, parse_address
from ._exceptions import ConfigError
from ._extproc import SERVICE_NAME

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


def load_document(text: str, source: str) -> Any:
    """Parse JSON or YAML (JSON is YAML); `ConfigError` names the line of a syntax error."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}:{where} not valid JSON or YAML: {problem}") from None


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
                          f"'messages', got {_kind(doc)}")
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
        _check_namespaces(metadata, f"{source}: metadata")
        for request in requests:
            for namespace, values in metadata.items():
                json_format.ParseDict(values, request.metadata_context.filter_metadata[namespace])
    attributes = doc.get("attributes")
    if attributes is not None:
        _check_namespaces(attributes, f"{source}: attributes")
        for name, values in attributes.items():
            json_format.ParseDict(values, first.attributes[name])
    for request in requests:
        request.observability_mode = observability
    return StreamDescription(requests, observability)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _phase_of(item: Any, where: str) -> str:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a mapping like {{request_headers: ...}}, got "
                          f"{_kind(item)}")
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
        getattr(request, phase).CopyFrom(pb.HttpBody(body=_body(value, f"{where}.{phase}"),
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
                              f"{_kind(text)}")
        out.headers.add(key=name.lower(), raw_value=str(text).encode())
    return out


def _body(value: Any, where: str) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, dict) and set(value) == {"base64"} and isinstance(value["base64"],
                                                                          str):
        try:
            return base64.b64decode(value["base64"], validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{where}: base64 is not valid base64") from None
    raise ConfigError(f"{where}: expected text or {{base64: ...}}, got {_kind(value)}")


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
        raise ConfigError(f"{source}: protocol_config must be a mapping, got {_kind(value)}")
    try:
        json_format.ParseDict(value, config)
    except json_format.ParseError as exc:
        raise ConfigError(f"{source}: protocol_config: {_one_line(exc)}") from None
    return config


def _check_namespaces(value: Any, where: str) -> None:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) for k, v in value.items()):
        raise ConfigError(f"{where}: expected {{namespace: {{key: value}}}}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


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

def open_channel(target: str, *, tls: bool = False, ca: str | None = None,
                 authority: str | None = None) -> grpc.aio.Channel:
    """A channel to ``target``: plaintext, or TLS (verified with ``ca`` when given)."""
    options: list[tuple[str, Any]] = [("grpc.default_authority", authority)] if authority else []
    if not (tls or ca):
        return grpc.aio.insecure_channel(target, options)
    roots = None
    if ca:
        try:
            with open(ca, "rb") as handle:
                roots = handle.read()
        except OSError as exc:
            raise ConfigError(f"cannot read CA file {ca!r}: {exc.strerror or exc}") from None
    if authority:
        options.append(("grpc.ssl_target_name_override", authority))
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(roots), options)


async def play(target: str, method: str, request_type: Any, response_type: Any,
               requests: Sequence[Any], *, show: Callable[[Any], None],
               last_reply: Callable[[Any], bool], unanswered: str, err: TextIO,
               wait_for_replies: bool = True, tls: bool = False, ca: str | None = None,
               authority: str | None = None, metadata: Sequence[tuple[str, str]] = (),
               timeout: float = 10.0) -> int:
    """Play ``requests`` on one stream as Envoy does: each after the previous reply.

    The loop L7 and L4 ``send`` share. Stops after a reply for which ``last_reply`` is true,
    or when the server ends the stream unanswered (saying so, with ``unanswered`` as what Envoy
    would then do). Returns 0, or 1 after printing the gRPC status and details to ``err``.
    """
    async with open_channel(target, tls=tls, ca=ca, authority=authority) as channel:
        call = channel.stream_stream(
            method, request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )(metadata=tuple(metadata) or None, timeout=timeout)
        sent = 0
        try:
            for request in requests:
                await call.write(request)
                sent += 1
                if not wait_for_replies:
                    continue
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    print(f"calloutkit: the server ended the stream after {sent} of "
                          f"{len(requests)} messages without answering the last "
                          f"({unanswered})", file=err, flush=True)
                    break
                show(reply)
                if last_reply(reply):
                    break
            await call.done_writing()
            while (reply := await call.read()) is not grpc.aio.EOF:
                show(reply)
            code = await call.code()
            if code != grpc.StatusCode.OK:
                return _grpc_error(err, code, await call.details())
        except grpc.aio.AioRpcError as exc:
            return _grpc_error(err, exc.code(), exc.details())
    return 0


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


def _grpc_error(err: TextIO, code: grpc.StatusCode, details: str | None) -> int:
    print(f"calloutkit: error: gRPC {code.name}: {details or ''}", file=err, flush=True)
    return 1


# -- the command ---------------------------------------------------------------------------

def read_source(path: str) -> tuple[str, str]:
    """The text of a description (``-`` is stdin) and a name for error messages."""
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
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key.strip().lower(), val


def run_send(args: argparse.Namespace) -> int:
    """Parse the description, then send it (``calloutkit send``)."""
    if getattr(args, "l4", False):
        from ._send_network import run_network_send

        return run_network_send(args)
    text, source = read_source(args.file)
    description = parse_stream(text, source)
    target = format_address(parse_address(args.address, "--address"))
    return run_printing(send_stream(
        target, description, out=sys.stdout, err=sys.stderr, tls=args.tls, ca=args.ca,
        authority=args.authority, metadata=args.metadata, timeout=args.timeout,
        proto_json=args.proto_json, indent=2 if args.pretty else None))


def run_printing(sending: Coroutine[Any, Any, int]) -> int:
    """Run a ``send`` coroutine that prints to stdout; a closed stdout ends it with 0."""
    try:
        return asyncio.run(sending)
    except BrokenPipeError:  # `calloutkit send ... | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def add_parser(subparsers: Any) -> None:
    """Register ``calloutkit send``."""
    parser = subparsers.add_parser(
        "send", help="send a described ext_proc stream to a server and print the replies",
        description="Send the stream described in FILE (JSON or YAML; - or nothing for "
                    "stdin) to an ext_proc server, one message per reply as Envoy does, and "
                    "print each reply as a line of JSON. Exit code 1 on a gRPC error, 2 on a "
                    "bad description.")
    parser.add_argument("file", metavar="FILE", nargs="?", default="-")
    parser.add_argument("--address", "--target", dest="address", default="127.0.0.1:8080",
                        metavar="HOST:PORT",
                        help="the server's gRPC address (default 127.0.0.1:8080)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--ca-file", "--ca", dest="ca", metavar="PEM",
                        help="CA certificate that signed the server's (implies --tls)")
    parser.add_argument("--authority", metavar="NAME",
                        help="authority and TLS server name to present")
    parser.add_argument("--metadata", "-H", dest="metadata", action="append", default=[],
                        type=_metadata_pair, metavar="KEY=VALUE",
                        help="gRPC metadata on the stream (repeatable)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="deadline for the whole stream (default 10)")
    parser.add_argument("--pretty", action="store_true", help="indent each reply")
    parser.add_argument("--proto-json", action="store_true",
                        help="print the exact protobuf JSON (bytes in base64)")
    parser.add_argument("--l4", action="store_true",
                        help="FILE describes one TCP connection (read_data / write_data "
                             "messages) for a network (L4) callout server")
    parser.set_defaults(func=run_send)

