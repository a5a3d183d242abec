"""The coprocess messages, and `Hook`: the hook types in Python's words.

The messages are calloutkit's own generated bindings of Tyk's ``coprocess`` package (see
``proto/coprocess``); they are the same on the wire as Tyk's. Unknown fields (session fields a
newer gateway adds) survive a parse and a serialize.
"""

from __future__ import annotations

import enum

from .._generated.coprocess.coprocess_common_pb2 import HookType, StringSlice
from .._generated.coprocess.coprocess_mini_request_object_pb2 import MiniRequestObject
from .._generated.coprocess.coprocess_object_pb2 import Event, EventReply, Object
from .._generated.coprocess.coprocess_response_object_pb2 import Header, ResponseObject
from .._generated.coprocess.coprocess_return_overrides_pb2 import ReturnOverrides
from .._generated.coprocess.coprocess_session_state_pb2 import (
    AccessDefinition,
    AccessSpec,
    BasicAuthData,
    JWTData,
    Monitor,
    SessionState,
)

SERVICE_NAME = "coprocess.Dispatcher"
DISPATCH_METHOD = "/coprocess.Dispatcher/Dispatch"
DISPATCH_EVENT_METHOD = "/coprocess.Dispatcher/DispatchEvent"

__all__ = [
    "DISPATCH_EVENT_METHOD",
    "DISPATCH_METHOD",
    "SERVICE_NAME",
    "AccessDefinition",
    "AccessSpec",
    "BasicAuthData",
    "Event",
    "EventReply",
    "Header",
    "Hook",
    "HookType",
    "JWTData",
    "MiniRequestObject",
    "Monitor",
    "Object",
    "ResponseObject",
    "ReturnOverrides",
    "SessionState",
    "StringSlice",
]

_ALIASES = {"pre": 1, "post": 2, "postkeyauth": 3, "customkeycheck": 4, "authcheck": 4,
            "auth": 4, "response": 5}


class Hook(enum.IntEnum):
    """A hook type, numbered as ``coprocess.HookType`` (``Object.hook_type``).

    `Hook.parse` also accepts the names used in API definitions and by Tyk's enum::

        Hook.parse("pre") is Hook.PRE
        Hook.parse("auth_check") is Hook.CUSTOM_KEY_CHECK
        Hook.parse("PostKeyAuth") is Hook.POST_KEY_AUTH
    """

    PRE = 1
    POST = 2
    POST_KEY_AUTH = 3
    CUSTOM_KEY_CHECK = 4
    RESPONSE = 5

    @classmethod
    def parse(cls, value: Hook | int | str) -> Hook:
        """Return the Hook for an int, a Hook, or a name; ValueError names the choices."""
        if isinstance(value, str):
            number = _ALIASES.get(value.strip().lower().replace("_", "").replace("-", ""))
            if number is None:
                raise ValueError(f"unknown hook {value!r}; expected one of pre, post, "
                                 "post_key_auth, custom_key_check (auth_check), response")
            return cls(number)
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown hook type {value!r}; expected 1-5") from None

    @property
    def tyk_name(self) -> str:
        """The name in ``coprocess.HookType``: ``Pre``, ``CustomKeyCheck``, ..."""
        return str(HookType.Name(self.value))



# Field numbers of the text copies of the bodies: MiniRequestObject.body is 4 and
# ResponseObject.body is 3, inside Object.request (3) and Object.response (7).
_TEXT_BODY_OF = {3: 4, 7: 3}
_LENGTH_DELIMITED = 2
_START_GROUP, _END_GROUP = 3, 4


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _skip(data: bytes, pos: int, wire: int) -> int:
    """Where the payload of a field of type ``wire`` that starts at ``pos`` ends."""
    if wire == 0:
        return _varint(data, pos)[1]
    if wire in (1, 5):
        return pos + (8 if wire == 1 else 4)
    if wire == _LENGTH_DELIMITED:
        length, pos = _varint(data, pos)
        return pos + length
    if wire == _START_GROUP:
        # An unknown field may be a (deprecated) group, which protobuf keeps: skip to its
        # end-group key, counting nested groups without recursing.
        depth = 1
        while depth:
            key, pos = _varint(data, pos)
            inner = key & 7
            if inner == _START_GROUP:
                depth += 1
            elif inner == _END_GROUP:
                depth -= 1
            else:
                pos = _skip(data, pos, inner)
            if pos > len(data):
                raise ValueError("truncated group")
        return pos
    raise ValueError(f"unsupported wire type {wire}")


def _fields(data: bytes) -> list[tuple[int, int, int, int, int]]:
    """(number, wire type, key start, payload start, end) of each field of a message."""
    out, pos = [], 0
    while pos < len(data):
        begin = pos
        key, payload = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _LENGTH_DELIMITED:
            length, payload = _varint(data, payload)
            end = payload + length
        else:
            end = _skip(data, payload, wire)
        if end > len(data):
            raise ValueError("truncated field")
        out.append((number, wire, begin, payload, end))
        pos = end
    return out


def without_text_bodies(data: bytes) -> bytes:
    """A serialised Object minus ``request.body`` and ``response.body``; every other byte
    stays as it was (unknown fields and map order included).

    The gateway reads back only ``raw_body`` (request hooks since Tyk 2.8.0, Response hooks
    always), so echoing the text copy only doubles the reply: a 3 MiB body would make a
    6 MiB reply, over the gateway's default 4 MiB receive limit.
    """
    # Most Objects carry no text body (a GET, or a gateway that fills raw_body alone). Parsing
    # in C says so in about a microsecond; the field walk below is about 15 µs of Python per
    # reply (timeit on a 426-byte Object).
    try:
        parsed = Object.FromString(data)
    except Exception:
        parsed = None  # the walk decides, byte by byte
    if parsed is not None and not parsed.request.body and not parsed.response.body:
        return data
    out, last = bytearray(), 0
    for number, wire, begin, payload, end in _fields(data):
        drop = _TEXT_BODY_OF.get(number)
        if drop is None or wire != _LENGTH_DELIMITED:
            continue
        inner = data[payload:end]
        kept = b"".join(inner[b:e] for n, _, b, _, e in _fields(inner) if n != drop)
        if len(kept) == len(inner):
            continue
        key_end = _varint(data, begin)[1]
        out += data[last:key_end] + _encode_varint(len(kept)) + kept
        last = end
    if last == 0:
        return data
    return bytes(out + data[last:])
