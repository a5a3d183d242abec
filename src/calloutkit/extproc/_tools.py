"""Helpers that build ext_proc replies the way Envoy reads them.

The documented names and signatures (`add_header_mutation`, `add_body_mutation`,
`header_immediate_response`, `deny_callout`, `headers_contain`, `body_contains`,
`build_dynamic_forwarding_metadata`) plus lookups and reply decorators. Every header value is
written to ``HeaderValue.raw_value``: Envoy ignores ``value``.

Example::

    from calloutkit.tools import add_header_mutation, get_header

    def on_request_headers(self, headers, context):
        user = get_header(headers, "x-user") or "anonymous"
        return add_header_mutation(add=[("x-user-seen", user)], remove=["x-debug"])
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format, struct_pb2

from ._context import CalloutContext
from ._headers import header_text as _text
from ._headers import header_values as _header_values

logger = logging.getLogger(__name__)

HeaderAppendAction = base_pb2.HeaderValueOption.HeaderAppendAction
ProcessingMode = processing_mode_pb2.ProcessingMode

__all__ = [
    "add_body_mutation",
    "add_dynamic_metadata",
    "add_header_mutation",
    "add_trailer_mutation",
    "body_contains",
    "build_dynamic_forwarding_metadata",
    "deny_callout",
    "get_header",
    "header_dict",
    "header_immediate_response",
    "header_mutation",
    "headers_contain",
    "override_mode",
]


def _raw(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def header_mutation(add: Iterable[tuple[str, str | bytes]] | None = None,
                    remove: Iterable[str] | None = None,
                    append_action: int | None = None) -> pb.HeaderMutation:
    """Build a `HeaderMutation` (values in ``raw_value``, keys lower-cased).

    Envoy's ext_proc filter (1.40) overwrites an existing header unless the deprecated
    ``append`` flag is set, and ignores ``append_action``; so ``APPEND_IF_EXISTS_OR_ADD`` also
    sets ``append``, which makes Envoy keep the old value and add the new one.

    >>> m = header_mutation(add=[("X-A", "1")], remove=["x-b"])
    >>> m.set_headers[0].header.raw_value
    b'1'
    """
    mutation = pb.HeaderMutation()
    _fill_mutation(mutation, add, remove, append_action)
    return mutation


def _fill_mutation(mutation: pb.HeaderMutation, add: Iterable[tuple[str, str | bytes]] | None,
                   remove: Iterable[str] | None, append_action: int | None,
                   lower: bool = True) -> None:
    # Written in place: building a HeaderMutation and copying it in costs a copy per reply.
    # ``lower=False`` keeps keys as given, as the documented helpers do, so code comparing
    # their replies with its own messages sees the same keys; Envoy lower-cases them anyway.
    options = mutation.set_headers
    for key, value in add or ():
        header = options.add().header
        header.key = key.lower() if lower else key
        header.raw_value = value if isinstance(value, bytes) else str(value).encode()
    if append_action is not None:
        for option in options:
            option.append_action = append_action  # type: ignore[assignment]
            if append_action == HeaderAppendAction.APPEND_IF_EXISTS_OR_ADD:
                option.append.value = True
    if remove:
        mutation.remove_headers.extend(k.lower() if lower else k for k in remove)


def add_header_mutation(add: list[tuple[str, str]] | None = None,
                        remove: list[str] | None = None,
                        clear_route_cache: bool = False,
                        append_action: int | None = None) -> pb.HeadersResponse:
    """A `HeadersResponse` that sets ``add`` headers and removes ``remove`` ones.

    ``append_action`` is a `HeaderValueOption.HeaderAppendAction`. Left out, Envoy replaces
    a header that is already there; ``APPEND_IF_EXISTS_OR_ADD`` keeps it and adds a second
    value (Envoy 1.40's ext_proc treats every other action as a replace). Keys are kept as
    given (Envoy lower-cases them).

    >>> reply = add_header_mutation(add=[("X-Foo", "bar")])
    >>> reply.response.header_mutation.set_headers[0].header.key
    'X-Foo'
    """
    response = pb.HeadersResponse()
    _fill_mutation(response.response.header_mutation, add, remove, append_action, lower=False)
    if clear_route_cache:
        response.response.clear_route_cache = True
    return response


def add_trailer_mutation(add: list[tuple[str, str]] | None = None,
                         remove: list[str] | None = None,
                         append_action: int | None = None) -> pb.TrailersResponse:
    """A `TrailersResponse` that sets and removes trailers.

    >>> add_trailer_mutation(add=[("x-checksum", "abc")]).header_mutation.set_headers[0].header.key
    'x-checksum'
    """
    response = pb.TrailersResponse()
    _fill_mutation(response.header_mutation, add, remove, append_action)
    return response


def add_body_mutation(body: str | bytes | None = None, clear_body: bool = False,
                      clear_route_cache: bool = False) -> pb.BodyResponse:
    """A `BodyResponse` that replaces the body (or this chunk) or clears it.

    As documented, an empty ``body`` (``""``, ``b""`` or None) with ``clear_body`` left
    False leaves the body as it is; ``clear_body=True`` empties it. In BUFFERED mode the
    server fixes ``content-length`` for you when the length changes.

    >>> add_body_mutation(body="new").response.body_mutation.body
    b'new'
    >>> add_body_mutation(body="").response.HasField("body_mutation")
    False
    """
    response = pb.BodyResponse()
    if body:
        response.response.body_mutation.body = _raw(body)
    elif clear_body:
        response.response.body_mutation.clear_body = True
    if clear_route_cache:
        response.response.clear_route_cache = True
    return response


def header_immediate_response(code: int, headers: list[tuple[str, str]] | None = None,
                              append_action: int | None = None,
                              body: str | bytes | None = None,
                              details: str | None = None) -> pb.ImmediateResponse:
    """An `ImmediateResponse`: Envoy answers the client with it; the upstream is not called.

    ``code`` is an HTTP status (an int or `envoy.type.v3.StatusCode`); ``details`` shows up
    in Envoy's ``%RESPONSE_CODE_DETAILS%``. Header keys are kept as given (Envoy lower-cases
    them).

    >>> header_immediate_response(403, body="denied\\n").status.code
    403
    """
    response = pb.ImmediateResponse()
    response.status.code = int(code)  # type: ignore[assignment]
    _fill_mutation(response.headers, headers, None, append_action, lower=False)
    if body is not None:
        response.body = _raw(body)
    if details:
        response.details = details
    return response


def deny_callout(context: Any, msg: str | None = None) -> None:
    """End the stream with PERMISSION_DENIED; Envoy fails the request (500 by default, or
    ``status_on_error``). For a specific status to the client, return
    `header_immediate_response` instead.

    Example::

        if not headers_contain(headers, "authorization"):
            deny_callout(context, "missing credentials")
    """
    msg = msg or "Callout DENIED."
    logger.warning(msg)
    context.abort(grpc.StatusCode.PERMISSION_DENIED, msg)


def header_dict(headers: pb.HttpHeaders | pb.HttpTrailers | base_pb2.HeaderMap
                ) -> dict[str, str]:
    """Headers as ``{lower-case name: value}`` (the last value wins), read from ``raw_value``.

    >>> header_dict(pb.HttpHeaders())
    {}
    """
    return {h.key.lower(): _text(h) for h in _header_values(headers)}


def get_header(headers: pb.HttpHeaders | pb.HttpTrailers | base_pb2.HeaderMap, name: str,
               default: str | None = None) -> str | None:
    """The value of header ``name`` (case-insensitive), or ``default``.

    >>> get_header(pb.HttpHeaders(), ":path", "/")
    '/'
    """
    name = name.lower()
    for h in _header_values(headers):
        if h.key.lower() == name:
            return _text(h)
    return default


def headers_contain(http_headers: pb.HttpHeaders | pb.HttpTrailers, key: str,
                    value: str | None = None) -> bool:
    """True if header ``key`` (case-insensitive) is present, and equals ``value`` if given.

    >>> headers_contain(pb.HttpHeaders(), "x-any")
    False
    """
    key = key.lower()
    for h in _header_values(http_headers):
        if h.key.lower() == key:
            if value is None:
                return True
            if _text(h) == value:
                return True
    return False


def body_contains(http_body: pb.HttpBody, body: str | bytes) -> bool:
    """True if ``body`` occurs in the body bytes; safe on binary (non-UTF-8) bodies.

    >>> body_contains(pb.HttpBody(body=b"\\xff\\xfeneedle"), "needle")
    True
    """
    return _raw(body) in http_body.body


def build_dynamic_forwarding_metadata(
        ip_address: str, port_number: int,
        namespace: str = "com.google.envoy.dynamic_forwarding.selected_endpoints",
) -> struct_pb2.Struct:
    """Dynamic metadata that selects ``ip_address:port_number`` as the primary endpoint.

    >>> s = build_dynamic_forwarding_metadata("10.0.0.1", 80)
    >>> s["com.google.envoy.dynamic_forwarding.selected_endpoints"]["primary"]
    '10.0.0.1:80'
    """
    metadata = struct_pb2.Struct()
    metadata.update({namespace: {"primary": f"{ip_address}:{port_number}"}})
    return metadata


def _as_processing_response(context: CalloutContext, reply: Any) -> pb.ProcessingResponse:
    if isinstance(reply, pb.ProcessingResponse):
        return reply
    request = context.request
    phase = request.WhichOneof("request") if request is not None else None
    if phase is None:
        raise ValueError("no ProcessingRequest on this context yet")
    response = pb.ProcessingResponse()
    if isinstance(reply, pb.ImmediateResponse):
        response.immediate_response.CopyFrom(reply)
    elif reply is None:
        getattr(response, phase).SetInParent()
    else:
        getattr(response, phase).CopyFrom(reply)
    return response


def _mode(value: Any) -> int:
    if isinstance(value, str):
        return int(ProcessingMode.BodySendMode.Value(value.upper()))
    return int(value)


def override_mode(context: CalloutContext, reply: Any = None, *,
                  request_body_mode: int | str | None = None,
                  response_body_mode: int | str | None = None,
                  response_header_mode: int | str | None = None,
                  request_trailer_mode: int | str | None = None,
                  response_trailer_mode: int | str | None = None) -> pb.ProcessingResponse:
    """Wrap a headers reply with a ``mode_override`` (needs ``allow_mode_override: true``).

    Body modes left out keep their effective value, so an override changes only what you
    name; modes are enum values or names (``"BUFFERED"``, ``"STREAMED"``, ...).

    Example::

        def on_request_headers(self, headers, context):
            wants_json = get_header(headers, "content-type", "").startswith("application/json")
            return override_mode(context, request_body_mode="BUFFERED" if wants_json else "NONE")
    """
    response = _as_processing_response(context, reply)
    mode = response.mode_override
    mode.request_body_mode = _mode(  # type: ignore[assignment]
        context.request_body_mode if request_body_mode is None else request_body_mode)
    mode.response_body_mode = _mode(  # type: ignore[assignment]
        context.response_body_mode if response_body_mode is None else response_body_mode)
    for field, value in (("response_header_mode", response_header_mode),
                         ("request_trailer_mode", request_trailer_mode),
                         ("response_trailer_mode", response_trailer_mode)):
        if value is not None:
            setattr(mode, field, ProcessingMode.HeaderSendMode.Value(value.upper())
                    if isinstance(value, str) else int(value))
    return response


def add_dynamic_metadata(context: CalloutContext, reply: Any,
                         metadata: Mapping[str, Any] | struct_pb2.Struct) -> pb.ProcessingResponse:
    """Attach dynamic metadata to a reply. Top-level keys are namespaces; Envoy keeps only
    those listed in the filter's ``metadata_options.receiving_namespaces``.

    Example::

        return add_dynamic_metadata(context, None, {"envoy.filters.http.ext_proc": {"user": u}})
    """
    response = _as_processing_response(context, reply)
    if isinstance(metadata, struct_pb2.Struct):
        response.dynamic_metadata.MergeFrom(metadata)
    else:
        json_format.ParseDict(dict(metadata), response.dynamic_metadata)
    return response


StatusCode = http_status_pb2.StatusCode
