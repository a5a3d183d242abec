"""authz_block_ip: refuse clients from blocked networks, before the request goes anywhere.

The client's address is the first ``x-forwarded-for`` entry when the request has one (Envoy
behind a load balancer), else the address of the connection Envoy accepted. Blocked clients
get ``403`` with ``x-client-ip-allowed: false``; the others go on, with
``x-client-ip-allowed: true`` for the upstream. An address that does not parse is refused.

``BLOCKED_NETWORKS`` (comma-separated CIDRs, default ``10.0.0.0/24``) sets the block list.

Try it::

    calloutkit serve examples/authz_block_ip
    calloutkit send --authz examples/authz_block_ip/check.yaml --address 127.0.0.1:8080

Envoy: the ext_authz HTTP filter in gRPC mode (``docs/authz.md``).
"""

from __future__ import annotations

import ipaddress
import logging
import os

from calloutkit import AuthzRequest, AuthzServer, allow_request, deny_request, nonblocking

logger = logging.getLogger(__name__)


def _networks(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(part.strip()) for part in text.split(",") if part.strip()]


class BlockIp(AuthzServer):
    """Deny clients whose address is in ``BLOCKED_NETWORKS``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.blocked = _networks(os.environ.get("BLOCKED_NETWORKS", "10.0.0.0/24"))

    @nonblocking  # no I/O: runs on the event loop, no thread hop
    def on_check(self, request: AuthzRequest, context):
        forwarded = request.headers.get("x-forwarded-for", "")
        client = forwarded.split(",")[0].strip() or request.source_address
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            logger.info("refused: client address %r does not parse", client)
            return deny_request(403, headers=[("x-client-ip-allowed", "false")])
        if any(address in network for network in self.blocked):
            logger.info("refused: %s is blocked", address)
            return deny_request(403, headers=[("x-client-ip-allowed", "false")])
        return allow_request(headers_to_set=[("x-client-ip-allowed", "true")])
