"""``calloutkit send --authz``: ask a running ext_authz server to check the described requests,
as Envoy's ext_authz filter would, and print each reply as a line of JSON.

A description is JSON or YAML: one request, or a list of them. Every key is optional::

    method: POST                      # GET
    path: /orders?id=7                # /
    host: shop.example                # localhost
    scheme: https                     # http
    headers: {x-api-key: k1}
    body: '{"item": "x"}'             # text, or {base64: ...}
    source: 10.0.0.5:4321             # the downstream client, as HOST:PORT
    destination: 127.0.0.1:10000
    principal: spiffe://shop/client
    context_extensions: {route: orders}
    metadata: {policy: {tier: gold}}  # metadata_context.filter_metadata

Each reply is printed with ``allowed`` (true or false) first, then the `CheckResponse` in
Envoy's field names. Exit code 1 on a gRPC error, 2 on a bad description.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any, TextIO

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as apb
from google.protobuf import json_format

from ..client._play import (
    body_bytes,
    check_namespaces,
    grpc_error,
    kind_of,
    load_document,
    open_channel,
    run_described,
)
from ..runtime._config import parse_address
from ..runtime._errors import ConfigError
from ._client import check_request
from ._server import SERVICE_NAME

_METHOD = f"/{SERVICE_NAME}/Check"
_TEXT_KEYS = ("method", "path", "host", "scheme", "principal")
_KEYS = {*_TEXT_KEYS, "headers", "body", "source", "destination", "context_extensions",
         "metadata"}


def parse_checks(text: str, source: str = "<stdin>") -> list[apb.CheckRequest]:
    """Turn a JSON or YAML description into `CheckRequest`s; `ConfigError` says what is wrong.

    >>> [r.attributes.request.http.path for r in parse_checks('[{"path": "/a"}, {}]')]
    ['/a', '/']
    """
    doc = load_document(text, source)
    if doc is None:
        doc = {}
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise ConfigError(f"{source}: expected a request or a non-empty list of requests")
    several = isinstance(doc, list)
    return [_check(item, f"{source}: request {n}" if several else source)
            for n, item in enumerate(items, 1)]


def _strings(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {kind_of(value)}")
    return {str(k): str(v) for k, v in value.items()}


def _address(value: Any, where: str) -> tuple[str, int]:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected HOST:PORT, got {kind_of(value)}")
    return parse_address(value, where)


def _check(item: Any, where: str) -> apb.CheckRequest:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a mapping like {{path: /}}, got {kind_of(item)}")
    unknown = sorted(str(k) for k in set(item) - _KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (expected "
                          f"{', '.join(sorted(_KEYS))})")
    options: dict[str, Any] = {}
    for key in _TEXT_KEYS:
        if key in item:
            if not isinstance(item[key], str):
                raise ConfigError(f"{where}: {key} must be text, got {kind_of(item[key])}")
            options[key] = item[key]
    if "headers" in item:
        options["headers"] = _strings(item["headers"], f"{where}: headers")
    if "context_extensions" in item:
        options["context_extensions"] = _strings(item["context_extensions"],
                                                 f"{where}: context_extensions")
    if "body" in item:
        options["body"] = body_bytes(item["body"], f"{where}: body")
    for key in ("source", "destination"):
        if key in item:
            options[key] = _address(item[key], f"{where}: {key}")
    if "metadata" in item:
        check_namespaces(item["metadata"], f"{where}: metadata")
        options["metadata"] = item["metadata"]
    return check_request(**options)


def reply_to_dict(response: apb.CheckResponse) -> dict[str, Any]:
    """A reply as JSON-ready data: ``allowed`` first, then Envoy's field names.

    >>> reply_to_dict(apb.CheckResponse())
    {'allowed': True}
    """
    data: dict[str, Any] = {"allowed": response.status.code == 0}
    data.update(json_format.MessageToDict(response, preserving_proto_field_name=True))
    return data


async def send_checks(target: str, requests: Sequence[apb.CheckRequest], *, out: TextIO,
                      err: TextIO, tls: bool = False, ca: str | None = None,
                      authority: str | None = None, metadata: Sequence[tuple[str, str]] = (),
                      timeout: float = 10.0, indent: int | None = None) -> int:
    """Send each check in turn; print each reply. Returns 0, or 1 after a gRPC error."""
    async with open_channel(target, tls=tls, ca=ca, authority=authority) as channel:
        check = channel.unary_unary(_METHOD,
                                    request_serializer=apb.CheckRequest.SerializeToString,
                                    response_deserializer=apb.CheckResponse.FromString)
        for request in requests:
            try:
                reply = await check(request, metadata=tuple(metadata) or None,
                                    timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                return grpc_error(err, exc.code(), exc.details())
            print(json.dumps(reply_to_dict(reply), indent=indent), file=out, flush=True)
    return 0


def run_authz_send(args: argparse.Namespace) -> int:
    """``calloutkit send --authz``: parse the description in ``args.file``, then send it."""
    return run_described(args, parse_checks, send_checks)
