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
