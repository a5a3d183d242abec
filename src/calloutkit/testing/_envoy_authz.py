"""`authz_envoy_config`: a real Envoy with the ext_authz HTTP filter in front of an upstream.

HTTP listener -> ext_authz (gRPC, ``transport_api_version: V3``) -> router -> upstream, every
port chosen by the kernel; run it with `Envoy`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._envoy import _access_log, _bootstrap, _cluster

_EXT_AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"


def authz_envoy_config(authz_port: int, upstream_port: int, *,
                       failure_mode_allow: bool = False, status_on_error: int | None = None,
                       timeout: str = "2s", with_request_body: Mapping[str, Any] | None = None,
                       include_peer_certificate: bool = False,
                       encode_raw_headers: bool = False,
                       context_extensions: Mapping[str, str] | None = None,
                       authz_tls_ca: str | None = None,
                       filter_options: Mapping[str, Any] | None = None,
                       listener_port: int = 0, admin_port: int = 0,
                       access_log: bool = True) -> dict[str, Any]:
    """An Envoy 1.40 bootstrap: listener -> ext_authz -> router -> upstream.

    ``status_on_error`` is the HTTP status Envoy answers when the authorization server
    cannot be reached or ends the call with an error (Envoy's default: 403), unless
    ``failure_mode_allow`` lets such requests through. ``with_request_body`` uses Envoy's
    field names (``{"max_request_bytes": 8192, "allow_partial_message": True}``);
    ``context_extensions`` go on the route, so every check carries them. ``filter_options``
    are merged into the filter's config as they are.

    Example::

        config = authz_envoy_config(server.plaintext_port, upstream.port,
                                    with_request_body={"max_request_bytes": 4096})
        with Envoy(config) as envoy:
            print(http_request(envoy.url + "/").status)
    """
    ext_authz: dict[str, Any] = {
        "@type": _EXT_AUTHZ, "transport_api_version": "V3",
        "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}, "timeout": timeout},
        "failure_mode_allow": failure_mode_allow,
        "include_peer_certificate": include_peer_certificate,
        "encode_raw_headers": encode_raw_headers,
    }
    if status_on_error is not None:
        ext_authz["status_on_error"] = {"code": status_on_error}
    if with_request_body is not None:
        ext_authz["with_request_body"] = dict(with_request_body)
    ext_authz.update(filter_options or {})
    route: dict[str, Any] = {"match": {"prefix": "/"},
                             "route": {"cluster": "upstream", "timeout": "60s"}}
    if context_extensions:
        route["typed_per_filter_config"] = {"envoy.filters.http.ext_authz": {
            "@type": _PER_ROUTE,
            "check_settings": {"context_extensions": dict(context_extensions)}}}
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager."
                 "v3.HttpConnectionManager",
        "stat_prefix": "ingress_http",
        "route_config": {"name": "local", "virtual_hosts": [{
            "name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": [
            {"name": "envoy.filters.http.ext_authz", "typed_config": ext_authz},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    if access_log:
        hcm["access_log"] = _access_log(
            " authz=%DYNAMIC_METADATA(envoy.filters.http.ext_authz)%")
    return _bootstrap(hcm, listener_port, admin_port, [
        _cluster("authz", authz_port, http2=True, tls_ca=authz_tls_ca),
        _cluster("upstream", upstream_port, http2=False)])
