"""Which metadata crosses the proxy, in each direction.

grpcio refuses a call whose metadata holds a pseudo-header (``:authority``) or an upper-case
key, and silently drops or overrides the transport's own keys (``user-agent``, ``te``,
``content-type``, ``grpc-timeout``). Everything an application put on the call is forwarded,
``-bin`` keys included (their values are bytes). Hop-by-hop HTTP keys describe one connection,
not the call, so they stop at the proxy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

MetadataValue = str | bytes
Metadata = Sequence[tuple[str, MetadataValue]]
Pairs = tuple[tuple[str, MetadataValue], ...]

_TRANSPORT = frozenset({"user-agent", "te", "content-type", "grpc-timeout", "host",
                        "connection", "keep-alive", "proxy-connection", "transfer-encoding",
                        "upgrade", "grpc-accept-encoding", "grpc-encoding"})
# The only reserved keys an application may carry end to end.
_GRPC_KEPT = frozenset({"grpc-trace-bin", "grpc-tags-bin", "grpc-status-details-bin"})


def forwardable(metadata: Iterable[tuple[str, MetadataValue]]) -> Pairs:
    """The part of ``metadata`` that may be sent on another call, keys lower-cased.

    Example::

        >>> forwardable([(":authority", "x"), ("User-Agent", "y"), ("X-Team", "a")])
        (('x-team', 'a'),)
    """
    out: list[tuple[str, MetadataValue]] = []
    for key, value in metadata:
        if not key or key[0] == ":":
            continue
        key = key.lower()
        if key in _TRANSPORT or (key.startswith("grpc-") and key not in _GRPC_KEPT):
            continue
        out.append((key, value))
    return tuple(out)
