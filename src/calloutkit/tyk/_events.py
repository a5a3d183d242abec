"""Gateway events (``DispatchEvent``): `GatewayEvent` and `EventHandler`.

The gateway fires an event to a gRPC plugin server when an API has an event handler with
``"handler_name": "cp_dynamic_handler"`` and ``"handler_meta": {"name": "<name>"}``. The
payload is JSON text; delivery is asynchronous and the reply is ignored.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

from ..runtime._errors import CalloutError


@dataclasses.dataclass(frozen=True)
class GatewayEvent:
    """One event from the gateway, with its JSON payload decoded.

    ``payload`` is the whole decoded JSON; the other attributes are its usual parts:
    ``type`` (``message.Type``, e.g. ``"AuthFailure"``), ``meta`` (``message.Meta``),
    ``timestamp`` (``message.TimeStamp``, Go's time format), ``handler_name`` (the
    ``handler_meta.name`` of the API's event handler), ``api_id`` and ``org_id``.

    Example::

        def audit(event: GatewayEvent) -> None:
            logger.info("%s on %s from %s", event.type, event.api_id, event.meta.get("Origin"))
    """

    payload: Mapping[str, Any]
    type: str
    meta: Mapping[str, Any]
    timestamp: str
    handler_name: str
    api_id: str
    org_id: str

    @classmethod
    def decode(cls, text: str) -> GatewayEvent:
        """Decode an ``Event.payload``; CalloutError says what is wrong with it."""
        try:
            payload = json.loads(text)
        except ValueError as exc:
            raise CalloutError(f"event payload is not JSON ({exc})") from None
        except RecursionError:
            raise CalloutError("event payload is JSON nested too deeply") from None
        if not isinstance(payload, dict):
            raise CalloutError(f"event payload is JSON {type(payload).__name__}, not an object")
        message = payload.get("message")
        message = message if isinstance(message, dict) else {}
        meta = message.get("Meta")
        spec = payload.get("spec")
        spec = spec if isinstance(spec, dict) else {}
        return cls(payload=payload, type=_text(message.get("Type")),
                   meta=meta if isinstance(meta, dict) else {},
                   timestamp=_text(message.get("TimeStamp")),
                   handler_name=_text(payload.get("handler_name")),
                   api_id=_text(spec.get("APIID")), org_id=_text(spec.get("OrgID")))

    @property
    def originating_request(self) -> bytes | None:
        """The raw HTTP request behind the event (``Meta.OriginatingRequest``), if any."""
        value = self.meta.get("OriginatingRequest")
        if not isinstance(value, str) or not value:
            return None
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


EventFunc = Callable[[GatewayEvent], Any]


@dataclasses.dataclass(frozen=True)
class EventHandler:
    """Call ``func`` for events of one type, for one handler name, for both, or (neither
    given) for every event. ``func`` may be ``def`` or ``async def``.

    Example::

        class Server(TykPluginServer):
            events = [
                EventHandler(alert, event_type="AuthFailure"),
                EventHandler(audit, handler_name="audit_log"),
            ]
    """

    func: EventFunc
    event_type: str | None = None
    handler_name: str | None = None

    def matches(self, event: GatewayEvent) -> bool:
        return ((self.event_type is None or self.event_type == event.type)
                and (self.handler_name is None or self.handler_name == event.handler_name))
