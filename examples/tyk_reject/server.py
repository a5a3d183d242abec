"""Reject requests with a JSON error, before they reach the upstream.

``GuardRequests`` (Pre) shows both ways to answer from a plugin:

- ``call.reject(status, message)``: Tyk's own JSON error ``{"error": "..."}`` (its error
  templates apply) and an AuthFailure event, whatever the hook. Used for blocked paths.
- ``call.respond(status, json=...)``: exactly this body and status, no event. Used for a
  method the API does not allow and for a JSON body that fails validation, with details.

Returning without either lets the request continue: a 200 from ``respond`` would be an
answer too, never "carry on". In the API definition::

    "custom_middleware": {"pre": [{"name": "GuardRequests"}], "driver": "grpc"}

Try it::

    calloutkit serve examples/tyk_reject
    calloutkit tyk dispatch --hook pre --name GuardRequests --url /admin/users
    calloutkit tyk dispatch --hook pre --name GuardRequests --method POST --url /orders \\
        --header 'Content-Type: application/json' --body '{"item": "x"}'
"""

from __future__ import annotations

from calloutkit import nonblocking
from calloutkit.tyk import Hook, Plugin, PluginCall, TykPluginServer

BLOCKED_PREFIXES = ("/admin", "/internal")
ALLOWED_METHODS = ("GET", "HEAD", "POST")
REQUIRED_ORDER_FIELDS = ("item", "quantity")


@nonblocking
def guard_requests(call: PluginCall) -> None:
    request = call.request
    if request.path.startswith(BLOCKED_PREFIXES):
        call.reject(403, f"{request.path} is not served through this gateway")
        return
    if request.method not in ALLOWED_METHODS:
        call.respond(405, json={"error": "method not allowed", "allowed": ALLOWED_METHODS},
                     headers={"Allow": ", ".join(ALLOWED_METHODS)})
        return
    if request.method == "POST" and request.headers.get("Content-Type", "").startswith(
            "application/json"):
        try:
            order = request.json()
        except ValueError as exc:
            call.respond(400, json={"error": "body is not JSON", "detail": str(exc)})
            return
        missing = [f for f in REQUIRED_ORDER_FIELDS
                   if not isinstance(order, dict) or f not in order]
        if missing:
            call.respond(422, json={"error": "invalid order", "missing": missing})


class GuardRequests(TykPluginServer):
    plugins = [Plugin("GuardRequests", guard_requests, hook=Hook.PRE)]


if __name__ == "__main__":
    GuardRequests().run()
