"""Transform response bodies: wrap JSON answers in an envelope.

``EnvelopeResponse`` (Response) turns an upstream JSON body into
``{"data": <body>, "meta": {"api": ..., "status": ...}}``, marks the response with
``X-Transformed``, and hides the upstream's ``Server`` header. Non-JSON responses pass
unchanged. The gateway sends ``response.raw_body`` to the client (the text ``body`` is never
read); assigning ``call.response.body`` sets it and keeps ``Content-Length`` right, which
gateways before 5.8 do not do themselves. In the API definition::

    "custom_middleware": {"response": [{"name": "EnvelopeResponse"}], "driver": "grpc"}

Try it::

    calloutkit serve examples/tyk_response_transform
    calloutkit tyk dispatch --hook response --name EnvelopeResponse --status 200 \\
        --response-header 'Content-Type: application/json' --response-body '[1, 2]'
"""

from __future__ import annotations

import json

from calloutkit.tyk import Hook, Plugin, PluginCall, TykPluginServer


async def envelope(call: PluginCall) -> None:
    response = call.response
    if not response.headers.get("Content-Type", "").startswith("application/json"):
        return
    try:
        data = response.json()
    except ValueError:
        return  # says JSON, is not: pass it on as it is
    response.body = json.dumps({"data": data,
                                "meta": {"api": call.api_id, "status": response.status}})
    response.set_header("X-Transformed", "envelope")
    response.delete_header("Server")


class EnvelopeResponse(TykPluginServer):
    plugins = [Plugin("EnvelopeResponse", envelope, hook=Hook.RESPONSE)]


if __name__ == "__main__":
    EnvelopeResponse().run()
