"""Log every Object the gateway sends, as JSON: a Pre and a Response plugin, and events.

The starting point of many Tyk plugin projects, on calloutkit: nothing is changed, so every
Object goes back byte for byte as it came. In the API definition (``driver: grpc``)::

    "custom_middleware": {"pre": [{"name": "MyPreRequestPlugin"}],
                          "response": [{"name": "MyResponsePlugin"}], "driver": "grpc"}

Try it::

    calloutkit serve examples/tyk_logging
    calloutkit tyk dispatch --object examples/tyk_logging/petstore_response.json
    calloutkit tyk dispatch --hook pre --name MyPreRequestPlugin \\
        --url '/pet/findByStatus?status=available'
"""

from __future__ import annotations

import logging

from google.protobuf.json_format import MessageToJson

from calloutkit.tyk import EventHandler, GatewayEvent, Hook, Plugin, PluginCall, TykPluginServer

logger = logging.getLogger("tyk_logging")


def log_object(call: PluginCall) -> None:
    logger.info("%s plugin %r from API %s\n%s", call.hook.tyk_name, call.name, call.api_id,
                MessageToJson(call.object))


def log_event(event: GatewayEvent) -> None:
    logger.info("event %s from API %s: %s", event.type, event.api_id, event.payload)


class LoggingPlugins(TykPluginServer):
    plugins = [
        Plugin("MyPreRequestPlugin", log_object, hook=Hook.PRE),
        Plugin("MyResponsePlugin", log_object, hook=Hook.RESPONSE),
    ]
    events = [EventHandler(log_event)]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    LoggingPlugins().run()
