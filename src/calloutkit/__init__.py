"""calloutkit: build, test and run API-gateway callout servers.

Envoy ext_proc (`CalloutServer`), Envoy network ext_proc (`NetworkCalloutServer`), Envoy
ext_authz (`AuthzServer`), Tyk gRPC
plugins (`calloutkit.tyk`) and a gRPC routing proxy (`calloutkit.proxy`), on one runtime
(`BaseServer`) with TLS and plaintext listeners, truthful gRPC and HTTP health, graceful drain
and a command line.

Example::

    from calloutkit import CalloutServer, add_header_mutation

    class Server(CalloutServer):
        def on_response_headers(self, headers, context):
            return add_header_mutation(add=[("foo", "bar")])
"""

from .authz._request import AuthzRequest
from .authz._server import AuthzContext, AuthzServer
from .authz._tools import allow_request, deny_request
from .cli import add_command_line_args
from .extproc._context import CalloutContext
from .extproc._headers import Headers
from .extproc._server import CalloutServer
from .extproc._tools import (
    add_body_mutation,
    add_dynamic_metadata,
    add_header_mutation,
    add_trailer_mutation,
    body_contains,
    build_dynamic_forwarding_metadata,
    deny_callout,
    get_header,
    header_dict,
    header_immediate_response,
    headers_contain,
    override_mode,
)
from .network._server import NetworkCalloutServer, NetworkContext, ProcessingResult
from .runtime._config import ServerConfig, parse_address
from .runtime._errors import CalloutError, CalloutKitError, ConfigError, ErrorPolicy, TargetError
from .runtime._invoke import nonblocking
from .runtime._logging import logging_context
from .runtime._middleware import CallInfo
from .runtime._server import BaseServer
from .runtime._tls import PeerIdentity

__version__ = "0.1.0"

__all__ = [
    "AuthzContext",
    "AuthzRequest",
    "AuthzServer",
    "BaseServer",
    "CallInfo",
    "CalloutContext",
    "CalloutError",
    "CalloutKitError",
    "CalloutServer",
    "ConfigError",
    "ErrorPolicy",
    "Headers",
    "NetworkCalloutServer",
    "NetworkContext",
    "PeerIdentity",
    "ProcessingResult",
    "ServerConfig",
    "TargetError",
    "add_body_mutation",
    "add_command_line_args",
    "add_dynamic_metadata",
    "add_header_mutation",
    "add_trailer_mutation",
    "allow_request",
    "body_contains",
    "build_dynamic_forwarding_metadata",
    "deny_callout",
    "deny_request",
    "get_header",
    "header_dict",
    "header_immediate_response",
    "headers_contain",
    "logging_context",
    "nonblocking",
    "override_mode",
    "parse_address",
]
