"""What every ``calloutkit send`` shares: reading a description, playing it on one stream.

The L7 (`calloutkit.extproc`) and L4 (`calloutkit.network`) senders parse their own
messages; this module reads the file, opens the channel and plays the messages one per reply,
as Envoy does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TextIO

import grpc
import yaml

from ..runtime._config import format_address, parse_address
from ..runtime._errors import ConfigError


def load_document(text: str, source: str) -> Any:
    """Parse JSON or YAML (JSON is YAML); `ConfigError` names the line of a syntax error."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}:{where} not valid JSON or YAML: {problem}") from None


def kind_of(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def body_bytes(value: Any, where: str) -> bytes:
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
    raise ConfigError(f"{where}: expected text or {{base64: ...}}, got {kind_of(value)}")


def check_namespaces(value: Any, where: str) -> None:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) for k, v in value.items()):
        raise ConfigError(f"{where}: expected {{namespace: {{key: value}}}}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


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
                return grpc_error(err, code, await call.details())
        except grpc.aio.AioRpcError as exc:
            return grpc_error(err, exc.code(), exc.details())
    return 0


def grpc_error(err: TextIO, code: grpc.StatusCode, details: str | None) -> int:
    print(f"calloutkit: error: gRPC {code.name}: {details or ''}", file=err, flush=True)
    return 1


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


def metadata_pair(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key.strip().lower(), val


def run_printing(sending: Coroutine[Any, Any, int]) -> int:
    """Run a ``send`` coroutine that prints to stdout; a closed stdout ends it with 0."""
    try:
        return asyncio.run(sending)
    except BrokenPipeError:  # `calloutkit send ... | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def run_described(args: argparse.Namespace, parse: Callable[[str, str], Any],
                  send: Callable[..., Coroutine[Any, Any, int]], **options: Any) -> int:
    """The ``send`` commands: parse the description in ``args.file``, send it to
    ``args.address`` with the connection flags, print to stdout (``options`` go to ``send``)."""
    text, source = read_source(args.file)
    described = parse(text, source)
    target = format_address(parse_address(args.address, "--address"))
    return run_printing(send(
        target, described, out=sys.stdout, err=sys.stderr, tls=args.tls, ca=args.ca,
        authority=args.authority, metadata=args.metadata, timeout=args.timeout,
        indent=2 if args.pretty else None, **options))
