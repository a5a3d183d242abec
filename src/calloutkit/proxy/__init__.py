"""calloutkit.proxy: a transparent gRPC routing proxy.

Frames stay raw bytes end to end, so any service, any call kind and any payload passes
through. A *director* chooses the backends of each call from its method, metadata or first
message (peeked without losing it); a primary answers the client, secondaries get a copy
(mirrored in the background, or waited for). On top sits a routing layer driven by a YAML file
(`ProxyServer`, ``calloutkit proxy --config routes.yaml``) that routes Tyk plugin calls per
API and Envoy ext_proc streams per route to pools of plugin servers.

Example::

    from calloutkit.proxy import Destination, StreamParameters, TransparentHandler

    channel = grpc.aio.insecure_channel("127.0.0.1:50051", options=channel_options())

    async def director(method, context, peeker):
        return StreamParameters(Destination(channel))

    server.add_generic_rpc_handlers((TransparentHandler(director),))
"""

from ._backends import Backend, Target
from ._channels import ChannelPool, channel_options
from ._config import (
    BackendConfig,
    HealthCheckConfig,
    MirroringConfig,
    RouteConfig,
    TlsConfig,
    TykMatch,
)
from ._director import Destination, Director, MirrorPolicy, Overflow, ProxyError, StreamParameters
from ._handler import (
    WELL_KNOWN_UNARY,
    TransparentHandler,
    register_service,
    register_stream_handlers,
)
from ._metadata import forwardable
from ._peeker import Peeker
from ._router import Router
from ._routes import RoutingConfig
from ._server import ProxyServer
from ._stream import handle_stream, handle_unary
from ._tyk import TykView, event_view, object_view
from ._wire import WireError, fields

__all__ = [
    "WELL_KNOWN_UNARY",
    "Backend",
    "BackendConfig",
    "ChannelPool",
    "Destination",
    "Director",
    "HealthCheckConfig",
    "MirrorPolicy",
    "MirroringConfig",
    "Overflow",
    "Peeker",
    "ProxyError",
    "ProxyServer",
    "RouteConfig",
    "Router",
    "RoutingConfig",
    "StreamParameters",
    "Target",
    "TlsConfig",
    "TransparentHandler",
    "TykMatch",
    "TykView",
    "WireError",
    "channel_options",
    "event_view",
    "fields",
    "forwardable",
    "handle_stream",
    "handle_unary",
    "object_view",
    "register_service",
    "register_stream_handlers",
]
