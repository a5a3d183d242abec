"""Build ext_authz answers: `allow_request` and `deny_request`.

Both return a complete `CheckResponse`. Header names are lower-cased, as HTTP/2 and Envoy want
them; values may be ``str`` or UTF-8 ``bytes``.

What Envoy 1.40's ext_authz filter reads from a ``HeaderValueOption`` (pinned by
tests/authz/test_authz_envoy.py), which is not what its ext_proc filter reads:

- ``header.value`` only. A header given only as ``raw_value`` reaches the upstream (or the
  client) with an empty value; when both are set, ``value`` wins.
- ``append``: unset or false replaces a header of the same name, true adds the value to it
  (joined with ``,``). ``append_action`` is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as apb
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format, struct_pb2, wrappers_pb2
from google.rpc import code_pb2, status_pb2

from ..runtime._errors import CalloutError

#: Headers: ``[(name, value), ...]`` or ``{name: value}``; values are str or bytes.
HeaderItems: TypeAlias = "Iterable[tuple[str, str | bytes]] | Mapping[str, str | bytes]"

_APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _pairs(items: HeaderItems | None, what: str, *,
           lower: bool = True) -> list[tuple[str, str]]:
    if items is None:
        return []
    if isinstance(items, Mapping):
        items = list(items.items())
    pairs = []
    for item in items:
        try:
            key, value = item
        except (TypeError, ValueError):
            raise CalloutError(f"{what}: expected (name, value) pairs, got {item!r}") from None
        if not isinstance(key, str) or not key:
            raise CalloutError(f"{what}: name {key!r} is not a non-empty str")
        if not isinstance(value, str | bytes):
            raise CalloutError(f"{what}: value of {key!r} is {type(value).__name__}, "
                               "not str or bytes")
        pairs.append((key.lower() if lower else key, _text(value, f"{what}: value of {key!r}")))
    return pairs


def _header(key: str, value: str) -> base_pb2.HeaderValue:
    # `value`, never `raw_value`: ext_authz reads only `value` (the opposite of ext_proc).
    return base_pb2.HeaderValue(key=key, value=value)


def _text(value: str | bytes, what: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            # `value` is a protobuf string: bytes that are not UTF-8 cannot travel in it.
            raise CalloutError(f"{what} is not UTF-8 text") from None
    return value


def _options(items: HeaderItems | None, what: str, *,
             append: bool | None = None) -> list[base_pb2.HeaderValueOption]:
    options = []
    for key, value in _pairs(items, what):
        option = base_pb2.HeaderValueOption(header=_header(key, value))
        if append is not None:
            option.append.CopyFrom(wrappers_pb2.BoolValue(value=append))
        options.append(option)
    return options


def _struct(values: Mapping[str, Any] | None, what: str) -> struct_pb2.Struct | None:
    if not values:
        return None
    struct = struct_pb2.Struct()
    try:
        json_format.ParseDict(dict(values), struct)
    except (json_format.ParseError, TypeError, ValueError) as exc:
        raise CalloutError(f"{what}: {exc}") from None
    return struct


def _names(items: Iterable[str] | str, what: str) -> list[str]:
    if isinstance(items, str):
        items = [items]
    names = list(items)
    for name in names:
        if not isinstance(name, str) or not name:
            raise CalloutError(f"{what}: {name!r} is not a non-empty str")
    return names


def allow_request(headers_to_add: HeaderItems | None = None, *,
                  headers_to_set: HeaderItems | None = None,
                  headers_to_append: HeaderItems | None = None,
                  headers_to_remove: Iterable[str] = (),
                  response_headers_to_add: HeaderItems | None = None,
                  query_parameters_to_set: HeaderItems | None = None,
                  query_parameters_to_remove: Iterable[str] = (),
                  dynamic_metadata: Mapping[str, Any] | None = None) -> apb.CheckResponse:
    """Let the request through, changed on its way to the upstream.

    - ``headers_to_add``: headers for the upstream request, as the documented callout API
      writes them (no ``append`` flag: Envoy replaces a header of the same name).
    - ``headers_to_set``: replace (or add) these headers. ``headers_to_append``: add a value
      to whatever the header already holds (Envoy joins them with ``,``).
    - ``headers_to_remove``: drop these request headers (not pseudo-headers nor ``host``).
    - ``response_headers_to_add``: headers Envoy adds to the response the client gets.
    - ``query_parameters_to_set`` / ``query_parameters_to_remove``: rewrite the query string.
    - ``dynamic_metadata``: values other filters and the access log read under the
      ``envoy.filters.http.ext_authz`` namespace.

    >>> allow_request([("x-user", "ada")]).ok_response.headers[0].header.key
    'x-user'
    """
    ok = apb.OkHttpResponse(
        headers=[*_options(headers_to_add, "headers_to_add"),
                 *_options(headers_to_set, "headers_to_set", append=False),
                 *_options(headers_to_append, "headers_to_append", append=True)],
        headers_to_remove=[n.lower() for n in _names(headers_to_remove, "headers_to_remove")],
        response_headers_to_add=_options(response_headers_to_add, "response_headers_to_add",
                                         append=False),
        query_parameters_to_set=[
            base_pb2.QueryParameter(key=k, value=v)
            for k, v in _pairs(query_parameters_to_set, "query_parameters_to_set",
                                  lower=False)],
        query_parameters_to_remove=_names(query_parameters_to_remove,
                                          "query_parameters_to_remove"))
    response = apb.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=ok)
    metadata = _struct(dynamic_metadata, "dynamic_metadata")
    if metadata is not None:
        response.dynamic_metadata.CopyFrom(metadata)
    return response


def deny_request(status_code: int = http_status_pb2.Forbidden, body: str | bytes | None = None,
                 headers: HeaderItems | None = None, *,
                 dynamic_metadata: Mapping[str, Any] | None = None) -> apb.CheckResponse:
    """Refuse the request: Envoy answers the client with ``status_code``, ``body`` and
    ``headers``, and the upstream never sees it.

    ``status_code`` is an HTTP status (``401``, or ``http_status_pb2.StatusCode.Unauthorized``
    as the documented callout API spells it); 403 by default.

    >>> deny_request(401, "who are you?").denied_response.status.code
    401
    """
    if isinstance(status_code, bool) or not isinstance(status_code, int) or not (
            200 <= status_code <= 599):
        raise CalloutError(f"deny_request: status_code {status_code!r} is not an HTTP status "
                           "(200-599)")
    if body is not None and not isinstance(body, str | bytes):
        raise CalloutError(f"deny_request: body is {type(body).__name__}, not str or bytes")
    body = _text(body or "", "deny_request: body")
    denied = apb.DeniedHttpResponse(status=http_status_pb2.HttpStatus(code=status_code),
                                    headers=_options(headers, "headers", append=False),
                                    body=body)
    response = apb.CheckResponse(status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED),
                                 denied_response=denied)
    metadata = _struct(dynamic_metadata, "dynamic_metadata")
    if metadata is not None:
        response.dynamic_metadata.CopyFrom(metadata)
    return response
