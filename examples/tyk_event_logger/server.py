"""Log gateway events: authentication failures, quota and rate limits, and an audit trail.

An API sends events to the plugin server through an event handler with
``"handler_name": "cp_dynamic_handler"``; ``handler_meta.name`` is the handler name here::

    "event_handlers": {"events": {
        "AuthFailure": [{"handler_name": "cp_dynamic_handler",
                         "handler_meta": {"name": "audit"}}],
        "QuotaExceeded": [{"handler_name": "cp_dynamic_handler",
                           "handler_meta": {"name": "audit"}}]}}

Handlers match by event type, by handler name, or both; every matching handler runs.

Try it::

    calloutkit serve examples/tyk_event_logger
    calloutkit tyk dispatch-event --type AuthFailure --handler-name audit --api-id pets \\
        --meta Path=/pets --meta Origin=203.0.113.7 --meta Key=demo-gold-key
"""

from __future__ import annotations

import json
import logging

from calloutkit.tyk import EventHandler, GatewayEvent, TykPluginServer

logger = logging.getLogger("tyk_events")
audit_log = logging.getLogger("tyk_events.audit")


def masked(key: object) -> str:
    text = str(key or "")
    return text[:4] + "..." if len(text) > 4 else "****"


def auth_failure(event: GatewayEvent) -> None:
    logger.warning("auth failure on API %s: %s %s from %s (key %s)", event.api_id,
                   event.meta.get("Message", ""), event.meta.get("Path", "?"),
                   event.meta.get("Origin", "?"), masked(event.meta.get("Key")))


def limit_hit(event: GatewayEvent) -> None:
    logger.warning("%s on API %s for key %s", event.type, event.api_id,
                   masked(event.meta.get("Key")))


async def audit(event: GatewayEvent) -> None:
    meta = {k: v for k, v in event.meta.items() if k != "OriginatingRequest"}
    if "Key" in meta:
        meta["Key"] = masked(meta["Key"])
    audit_log.info(json.dumps({"type": event.type, "api": event.api_id, "org": event.org_id,
                               "at": event.timestamp, "meta": meta}, sort_keys=True))


class EventLogger(TykPluginServer):
    events = [
        EventHandler(auth_failure, event_type="AuthFailure"),
        EventHandler(limit_hit, event_type="QuotaExceeded"),
        EventHandler(limit_hit, event_type="RatelimitExceeded"),
        EventHandler(audit, handler_name="audit"),
    ]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    EventLogger().run()
