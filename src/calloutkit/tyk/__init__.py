"""Tyk gRPC plugins: a ``coprocess.Dispatcher`` server with the gateway's rules built in.

Tyk Gateway calls ``Dispatch(Object) -> Object`` for every configured hook (Pre, Post,
PostKeyAuth, CustomKeyCheck/auth_check, Response) and ``DispatchEvent`` for events. List your
plugins by hook name; each receives a `PluginCall` whose helpers write exactly the fields the
gateway reads back, and the server always returns the Object it received.

Example::

    from calloutkit.tyk import Hook, Plugin, PluginCall, TykPluginServer

    def check_key(call: PluginCall) -> None:
        key = call.request.headers.get("Authorization", "")
        if key != "secret":
            call.reject(401, "unknown API key")
        else:
            call.authorize(key, rate=100, per=1, quota_max=1000, quota_renewal_rate=3600)

    class Server(TykPluginServer):
        plugins = [Plugin("MyAuthCheck", check_key, hook=Hook.CUSTOM_KEY_CHECK)]

Run it with ``calloutkit serve server.py`` and send it a call with ``calloutkit tyk dispatch``.
"""

from ..runtime._errors import ErrorPolicy
from ._call import PluginCall, PluginRequest, PluginResponse, tyk_error_body
from ._events import EventHandler, GatewayEvent
from ._headers import Headers
from ._proto import (
    AccessDefinition,
    AccessSpec,
    Event,
    EventReply,
    Header,
    Hook,
    HookType,
    MiniRequestObject,
    Object,
    ResponseObject,
    ReturnOverrides,
    SessionState,
)
from ._server import Plugin, TykPluginServer

__all__ = [
    "AccessDefinition",
    "AccessSpec",
    "ErrorPolicy",
    "Event",
    "EventHandler",
    "EventReply",
    "GatewayEvent",
    "Header",
    "Headers",
    "Hook",
    "HookType",
    "MiniRequestObject",
    "Object",
    "Plugin",
    "PluginCall",
    "PluginRequest",
    "PluginResponse",
    "ResponseObject",
    "ReturnOverrides",
    "SessionState",
    "TykPluginServer",
    "tyk_error_body",
]
