"""normalize_header: classify the client device and tell the upstream in one trusted header.

``client-device-type`` is set to ``mobile``, ``tablet``, ``desktop`` or ``bot``, from the host
the client asked for (``m.`` / ``mobile.`` hosts are mobile) and else from its user-agent. The
value overwrites whatever the client sent, so the upstream can trust it, and the route cache
is cleared so Envoy routes can match on it.

Envoy settings: request headers SEND (the default). Envoy sends the host as ``:authority``
(never as ``host``).

Run it::

    calloutkit serve examples/normalize_header
"""

from __future__ import annotations

from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.service.ext_proc.v3.external_processor_pb2 import HeadersResponse, HttpHeaders

from calloutkit import CalloutContext, CalloutServer, add_header_mutation, get_header, nonblocking

_BOTS = ("bot", "crawler", "spider", "slurp")
_TABLETS = ("ipad", "tablet", "kindle", "silk/")
_MOBILES = ("mobi", "iphone", "ipod", "android", "windows phone")


def device_type(host: str, user_agent: str) -> str:
    """Classify a client.

    >>> device_type("m.example.com", "")
    'mobile'
    >>> device_type("example.com", "Mozilla/5.0 (iPad; CPU OS 17_0 like Mac OS X)")
    'tablet'
    """
    if host.lower().startswith(("m.", "mobile.")):
        return "mobile"
    agent = user_agent.lower()
    if any(word in agent for word in _BOTS):
        return "bot"
    if any(word in agent for word in _TABLETS):
        return "tablet"
    # Android tablets say "Android" without "Mobile".
    if "android" in agent and "mobi" not in agent:
        return "tablet"
    if any(word in agent for word in _MOBILES):
        return "mobile"
    return "desktop"


class NormalizeHeaderServer(CalloutServer):
    """Sets ``client-device-type`` on every request."""

    @nonblocking
    def on_request_headers(self, headers: HttpHeaders,
                           context: CalloutContext) -> HeadersResponse:
        kind = device_type(get_header(headers, ":authority", "") or "",
                           get_header(headers, "user-agent", "") or "")
        return add_header_mutation(
            add=[("client-device-type", kind)],
            append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            clear_route_cache=True)
