"""``calloutkit proxy --config routes.yaml``: run the routing proxy, or ``--check`` the file.

Precedence of listener settings: flags, then ``CALLOUTKIT_*`` variables, then the file's
``listeners:`` section, then the runtime's defaults. Bad input ends with one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..proxy._config import RouteConfig
from ..proxy._routes import RoutingConfig
from ..proxy._tyk import HOOK_TYPES
from ..runtime._config import ENV_PREFIX, PATH_DEFAULTS, SERVER_OPTIONS, format_address
from ..runtime._errors import ConfigError
from ._main import OPTIONAL_BOOLS, add_server_arguments, server_kwargs

_BOOLS = {name for name, kind, _ in SERVER_OPTIONS if kind == "bool"}


def add_parser(subparsers: Any) -> None:
    """Register ``calloutkit proxy``."""
    parser = subparsers.add_parser(
        "proxy", help="run the gRPC routing proxy from a routing file",
        description="Route gRPC calls (Tyk plugin calls per API, Envoy ext_proc streams per "
                    "route, any service) to backends as a YAML routing file says. SIGHUP "
                    "reloads the file; SIGTERM drains.")
    parser.add_argument("--config", "-c", metavar="ROUTES.YAML",
                        default=os.environ.get(ENV_PREFIX + "PROXY_CONFIG"),
                        help="the routing file (or CALLOUTKIT_PROXY_CONFIG)")
    parser.add_argument("--check", action="store_true",
                        help="validate the routing file, print what it routes, and exit")
    security = parser.add_argument_group(
        "security", "override the routing file's security section (see docs/proxy.md)")
    security.add_argument("--proxy-error-detail", dest="expose_errors", action="store_true",
                          default=None,
                          help="put backend addresses and exception text in the proxy's own "
                               "error statuses (default: only in the log)")
    security.add_argument("--forward-reflection", dest="forward_reflection",
                          action="store_true", default=None,
                          help="route grpc.reflection.* calls like any other (default: "
                               "UNIMPLEMENTED)")
    security.add_argument("--trusted-metadata", dest="trusted_metadata", metavar="PEERS",
                          help="whose metadata may route calls: any, none, or "
                               "CIDR[,CIDR...] (unix for a Unix socket listener)")
    add_server_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The ``proxy`` command."""
    if not args.config:
        raise ConfigError("proxy: --config ROUTES.YAML is required (or CALLOUTKIT_PROXY_CONFIG)")
    routing = RoutingConfig.load(args.config)
    if args.check:
        print(describe(routing))
        return 0
    from ..proxy._server import ProxyServer

    security = {key: getattr(args, key) for key in ("expose_errors", "forward_reflection",
                                                     "trusted_metadata")
                if getattr(args, key) is not None}
    kwargs = server_kwargs(args)
    for option in list(kwargs):
        # Defaults the parser filled in are no choice of the user's: they must not hide what
        # the file says, nor read as a wish for TLS.
        if ((option in _BOOLS and option not in OPTIONAL_BOOLS and kwargs[option] is False)
                or kwargs[option] == PATH_DEFAULTS.get(option)):
            del kwargs[option]
    ProxyServer(routing, **kwargs, **security).run()
    return 0


def _route_line(route: RouteConfig) -> str:
    conditions = []
    if route.methods is not None:
        conditions.append("method " + " | ".join(route.methods))
    for key, values in route.metadata:
        conditions.append(f"{key} in {sorted(values)}")
    if route.tyk is not None:
        for field in ("api_id", "org_id", "hook_name", "hook_type", "request_method",
                      "path_prefix", "handler_name"):
            value = getattr(route.tyk, field)
            if field == "hook_type" and value is not None:
                value = {name for name, number in HOOK_TYPES.items() if number in value}
            if value is not None:
                conditions.append(f"tyk {field} in {sorted(value)}")
    text = f"{route.name}: {' and '.join(conditions) or 'everything'} -> {route.backend}"
    if route.mirrors:
        text += f" (mirrors: {', '.join(route.mirrors)})"
    if route.timeout is not None:
        text += f" (timeout {route.timeout:g}s)"
    return text


def describe(routing: RoutingConfig) -> str:
    """A human summary of a validated routing file."""
    lines = [f"{routing.path}: OK"]
    if routing.listeners:
        lines.append("listeners: " + ", ".join(
            f"{k}={format_address(v) if isinstance(v, tuple) else v}"
            for k, v in routing.listeners.items()))
    lines.append("backends:")
    for backend in routing.backends.values():
        extras = [backend.balancing]
        if backend.tls is not None:
            extras.append("tls")
        if backend.health_check is not None:
            extras.append(f"health check every {backend.health_check.interval:g}s")
        lines.append(f"  {backend.name}: {', '.join(backend.targets)} ({'; '.join(extras)})")
    lines.append("routes (first match wins):")
    lines += [f"  {i}. {_route_line(route)}" for i, route in enumerate(routing.routes, 1)]
    lines.append("  default: " + (_route_line(routing.default).split(": ", 1)[1].replace(
        "everything -> ", "") if routing.default else "none (UNIMPLEMENTED)"))
    lines.append("unary fast path: " + (", ".join(sorted(routing.unary_methods)) or "none"))
    security = routing.security
    trusted = security.trusted_metadata
    lines.append(f"security: expose_errors={security.expose_errors}, forward_reflection="
                 f"{security.forward_reflection}, trusted_metadata="
                 f"{'any' if trusted is None else ', '.join(trusted) or 'none'}")
    return "\n".join(lines)
