"""Whose metadata may route a call: the peers a routing file's ``trusted_metadata`` names.

Metadata is whatever the caller chose to send. Behind a gateway that sets it (Envoy's
``initial_metadata``), routing on it is sound only when nobody else can reach the proxy, or
when the proxy believes metadata from the gateway's addresses alone, as Envoy does with
``internal_address_config`` and ``xff_num_trusted_hops``: a request from elsewhere is treated
as external and its routing headers are not believed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import unquote

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The word in ``trusted_metadata`` for clients on a Unix domain socket listener.
UNIX = "unix"


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs or single addresses (``10.0.0.0/8``, ``127.0.0.1``, ``::1``); ValueError names a
    bad one."""
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR (e.g. 10.0.0.0/8, "
                             f"::1, or {UNIX!r})") from None
    return tuple(out)


def peer_address(peer: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str | None:
    """The address in a gRPC peer string (``ipv4:10.0.0.5:4242``, ``ipv6:%5B::1%5D:4242``),
    `UNIX` for a Unix socket, None when it cannot be read."""
    if not peer:
        return None
    kind, _, rest = unquote(peer).partition(":")
    if kind in ("unix", "unix-abstract"):
        return UNIX
    host = rest.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else ""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack listener shows IPv4 clients this way
    return address


class MetadataTrust:
    """Decides per call whether the routing file's ``metadata`` conditions may be believed.

    ``None`` trusts every peer (the default); an empty list trusts none (metadata conditions
    never match); otherwise only peers inside one of the networks, or on a Unix socket when
    `UNIX` is listed.

    Example::

        trust = MetadataTrust(["10.1.2.0/24"])
        trust.trusts("ipv4:10.1.2.7:51234")   # True
        trust.trusts("ipv4:192.0.2.1:51234")  # False
    """

    __slots__ = ("_networks", "_unix", "everyone")

    def __init__(self, trusted: Iterable[str] | None) -> None:
        self.everyone = trusted is None
        values = list(trusted or ())
        self._unix = UNIX in values
        self._networks = parse_networks(v for v in values if v != UNIX)

    def trusts(self, peer: str | None) -> bool:
        if self.everyone:
            return True
        address = peer_address(peer)
        if address is None:
            return False
        if address == UNIX:
            return self._unix
        return any(address in network for network in self._networks)
