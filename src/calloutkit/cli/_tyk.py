"""``calloutkit tyk dispatch`` and ``calloutkit tyk dispatch-event``: call a plugin server the
way Tyk Gateway does, and print what it answered as JSON.

``dispatch`` builds the Object from flags exactly as the gateway fills it (first header
values, ``Host``, params, ``return_overrides.response_code = -1``, ``spec``), or reads one in
the JSON form ``MessageToJson`` and grpcurl print (``--object payload.json``)::

    calloutkit tyk dispatch --hook pre --name MyPreRequestPlugin --api-id 1 \\
        --method GET --url '/pet/findByStatus?status=available' --header 'Accept: */*'
    calloutkit tyk dispatch --object petstore-response.json
    calloutkit tyk dispatch-event --type AuthFailure --handler-name audit --api-id 1

Exit codes: 0 answered, 1 the call failed with a gRPC status, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc
from google.protobuf import json_format

from ..runtime._config import format_address, parse_address
from ..runtime._errors import ConfigError
from ..tyk._proto import (
    DISPATCH_EVENT_METHOD,
    DISPATCH_METHOD,
    Event,
    EventReply,
    Hook,
    Object,
    SessionState,
)
from ..tyk.testing import HttpRequest, HttpResponse, event_payload, request_object, response_object

DEFAULT_TARGET = "127.0.0.1:8080"
_DESCRIPTION = """\
Call a plugin server the way Tyk Gateway does (dispatch, dispatch-event) and
print what it answered as JSON."""
_EPILOG = """\
examples:
  calloutkit tyk dispatch --hook pre --name MyPreRequestPlugin --api-id 1 \\
      --method GET --url '/pet/findByStatus?status=available' --header 'Accept: */*'
  calloutkit tyk dispatch --object petstore-response.json
  calloutkit tyk dispatch-event --type AuthFailure --handler-name audit --api-id 1

exit codes: 0 answered, 1 the call failed with a gRPC status, 2 bad input."""
_REQUEST_FLAGS = ("method", "url", "header", "body", "status", "response_header",
                  "response_body", "session", "raw_body_only")


def _read(value: str, what: str) -> bytes:
    """``@path`` reads a file, ``-`` reads stdin, anything else is the value itself."""
    if value == "-":
        return sys.stdin.buffer.read()
    if value.startswith("@"):
        try:
            with open(value[1:], "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {value[1:]!r}: {exc.strerror or exc}"
                              ) from None
    return value.encode()


def _read_json(value: str, what: str) -> str:
    """Like `_read`, and a value that does not start like JSON names a file (``payload.json``)."""
    if value in ("-",) or value.startswith("@") or value.lstrip()[:1] in ("{", "[", ""):
        data = _read(value, what)
    else:
        data = _read("@" + value, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: not UTF-8 text") from None


def _header(value: str, flag: str) -> tuple[str, str]:
    name, sep, rest = value.partition(":")
    if not sep or not name.strip():
        raise ConfigError(f"{flag} {value!r}: expected NAME:VALUE")
    return name.strip(), rest.strip()


def _json_message(value: str, message: Any, what: str) -> Any:
    try:
        return json_format.Parse(_read_json(value, what), message)
    except json_format.ParseError as exc:
        name = message.DESCRIPTOR.full_name
        detail = " ".join(str(exc).split())  # protobuf's message spans lines
        raise ConfigError(f"{what}: not a {name} in JSON: {detail}") from None


def _build_object(args: argparse.Namespace) -> Any:
    if args.object is not None:
        given = [f"--{f.replace('_', '-')}" for f in _REQUEST_FLAGS
                 if getattr(args, f) not in (None, [], False)]
        if given:
            raise ConfigError(f"{', '.join(given)} cannot be combined with --object; edit the "
                              "JSON instead")
        obj = _json_message(args.object, Object(), "--object")
        if args.hook is not None:
            obj.hook_type = _hook(args.hook).value
        if args.name is not None:
            obj.hook_name = args.name
        for key, value in (("APIID", args.api_id), ("OrgID", args.org_id)):
            if value is not None:
                obj.spec[key] = value
        if args.config_data is not None:
            obj.spec["config_data"] = _config_text(args.config_data)
        return obj
    if args.name is None:
        raise ConfigError("give --name (the hook's name in the API definition), or --object")
    hook = _hook(args.hook or "pre")
    if hook is not Hook.RESPONSE and (args.status is not None or args.response_header
                                      or args.response_body is not None):
        raise ConfigError("--status, --response-header and --response-body need --hook response")
    request = HttpRequest(method=args.method or "GET", url=args.url or "/",
                          headers=[_header(h, "--header") for h in args.header],
                          body=_read(args.body, "--body") if args.body is not None else b"")
    options: dict[str, Any] = dict(
        api_id=args.api_id or "", org_id=args.org_id or "",
        config_data=json.loads(_config_text(args.config_data)) if args.config_data else None,
        session=_json_message(args.session, SessionState(), "--session")
        if args.session is not None else None,
        raw_body_only=args.raw_body_only)
    if hook is Hook.RESPONSE:
        response = HttpResponse(
            status=args.status if args.status is not None else 200,
            headers=[_header(h, "--response-header") for h in args.response_header],
            body=_read(args.response_body, "--response-body")
            if args.response_body is not None else b"")
        return response_object(args.name, request, response, **options)
    return request_object(hook, args.name, request, **options)


def _hook(value: str) -> Hook:
    try:
        return Hook.parse(value)
    except ValueError as exc:
        raise ConfigError(f"--hook: {exc}") from None


def _config_text(value: str) -> str:
    text = _read_json(value, "--config-data")
    try:
        json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--config-data: not JSON ({exc})") from None
    return text


def _target(value: str) -> str:
    """``HOST:PORT`` (``tcp://`` as in Tyk's coprocess_grpc_server setting) or a one-line error;
    gRPC would otherwise take a bare host to mean port 443."""
    return format_address(parse_address(value.removeprefix("tcp://"), "--target"))


def _call(target: str, method: str, data: bytes, timeout: float) -> bytes:
    with grpc.insecure_channel(target) as channel:
        return bytes(channel.unary_unary(method)(data, timeout=timeout))


def _failed(what: str, exc: grpc.RpcError) -> int:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    print(f"calloutkit: error: {what} failed: {code.name if code else 'ERROR'}: {details}",
          file=sys.stderr)
    return 1


def _dispatch(args: argparse.Namespace) -> int:
    target = _target(args.target)
    obj = _build_object(args)
    if args.show_request:
        print(json_format.MessageToJson(obj, indent=2), file=sys.stderr)
    try:
        answer = _call(target, DISPATCH_METHOD, obj.SerializeToString(), args.timeout)
    except grpc.RpcError as exc:
        return _failed("Dispatch", exc)
    print(json_format.MessageToJson(Object.FromString(answer), indent=2))
    return 0


def _dispatch_event(args: argparse.Namespace) -> int:
    target = _target(args.target)
    if args.payload is not None:
        if args.type is not None or args.meta:
            raise ConfigError("--type and --meta cannot be combined with --payload")
        payload = _read_json(args.payload, "--payload")
        if not args.no_check:
            try:
                json.loads(payload)
            except ValueError as exc:
                raise ConfigError(f"--payload: not JSON ({exc}); --no-check sends it anyway"
                                  ) from None
    else:
        if args.type is None:
            raise ConfigError("give --type (e.g. AuthFailure) or --payload")
        meta = {}
        for item in args.meta:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"--meta {item!r}: expected KEY=VALUE")
            meta[key] = value
        payload = event_payload(args.type, meta, handler_name=args.handler_name or "",
                                api_id=args.api_id or "", org_id=args.org_id or "")
    try:
        answer = _call(target, DISPATCH_EVENT_METHOD,
                       Event(payload=payload).SerializeToString(), args.timeout)
    except grpc.RpcError as exc:
        return _failed("DispatchEvent", exc)
    print(json_format.MessageToJson(EventReply.FromString(answer)))
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", "-t", default=DEFAULT_TARGET,
                        help=f"plugin server HOST:PORT; tcp:// accepted (default {DEFAULT_TARGET})")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    parser.add_argument("--api-id", dest="api_id", help='spec["APIID"]')
    parser.add_argument("--org-id", dest="org_id", help='spec["OrgID"]')


def add_parser(subparsers: Any) -> None:
    """Add ``calloutkit tyk`` with its ``dispatch`` and ``dispatch-event`` commands."""
    # The module docstring is reST for the reference docs; --help gets plain text.
    tyk = subparsers.add_parser("tyk", help="call a Tyk plugin server as the gateway does",
                                description=_DESCRIPTION, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = tyk.add_subparsers(dest="tyk_command", metavar="COMMAND", required=True,
                                  parser_class=type(tyk))

    dispatch = commands.add_parser(
        "dispatch", help="send one Dispatch(Object) and print the returned Object as JSON",
        description="Send one Dispatch, built from flags as the gateway builds it or read "
                    "from --object, and print the returned Object as JSON.")
    _common(dispatch)
    dispatch.add_argument("--object", metavar="FILE", help="the Object as JSON (MessageToJson "
                          "form): FILE, - for stdin, or the JSON itself")
    dispatch.add_argument("--hook", help="pre, post, post_key_auth, auth_check, response "
                          "(default pre)")
    dispatch.add_argument("--name", help="the hook's name in the API definition")
    dispatch.add_argument("--config-data", dest="config_data", metavar="JSON",
                          help='the API\'s config_data (spec["config_data"]): JSON or FILE')
    dispatch.add_argument("--method", help="request method (default GET)")
    dispatch.add_argument("--url", help="path and query, listen path included (default /)")
    dispatch.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                          help="request header; repeat for more")
    dispatch.add_argument("--body", metavar="TEXT|@FILE", help="request body")
    dispatch.add_argument("--session", metavar="JSON|FILE",
                          help="the key's SessionState as JSON (Post, PostKeyAuth, Response)")
    dispatch.add_argument("--raw-body-only", dest="raw_body_only", action="store_true",
                          help="send raw_body only, as with raw_body_only in the API")
    dispatch.add_argument("--status", type=int, help="upstream status (--hook response)")
    dispatch.add_argument("--response-header", dest="response_header", action="append",
                          default=[], metavar="NAME:VALUE", help="upstream response header")
    dispatch.add_argument("--response-body", dest="response_body", metavar="TEXT|@FILE",
                          help="upstream response body")
    dispatch.add_argument("--show-request", dest="show_request", action="store_true",
                          help="also print the Object sent, on stderr")
    dispatch.set_defaults(func=_dispatch)

    event = commands.add_parser(
        "dispatch-event", help="send one DispatchEvent(Event)",
        description="Send one event payload, given as JSON or built from flags as the gateway "
                    "writes it.")
    _common(event)
    event.add_argument("--payload", metavar="JSON|FILE|-", help="the payload, as is")
    event.add_argument("--no-check", dest="no_check", action="store_true",
                       help="send --payload even when it is not JSON")
    event.add_argument("--type", help="message.Type, e.g. AuthFailure, QuotaExceeded")
    event.add_argument("--handler-name", dest="handler_name",
                       help="handler_meta.name of the API's event handler")
    event.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                       help="message.Meta entry; repeat for more")
    event.set_defaults(func=_dispatch_event)
