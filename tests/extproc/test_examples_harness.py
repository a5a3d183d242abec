"""The harness the example tests share: several examples behind one real Envoy.

`Gateway` starts the named examples in process (loaded exactly as ``calloutkit serve`` loads
them), an echoing upstream, and one Envoy whose routes pick the callout by the ``x-example``
request header (a per-route ``grpc_service`` override), so one Envoy per processing mode
serves many examples. The servers run on an event loop in a background thread, so the tests
themselves stay plain synchronous code that sends HTTP requests.

The tests in this file check the harness itself: each route reaches its own callout only.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import socket
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import LOOPBACK

from calloutkit import CalloutServer
from calloutkit.cli._loader import load_target
from calloutkit.testing import Envoy, HttpResponse, UpstreamServer, envoy_config, http_request
from calloutkit.testing._http1 import read_body, read_head

pytestmark = pytest.mark.envoy

T = TypeVar("T")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
_EXT_PROC = "envoy.filters.http.ext_proc"


def load_example(name: str) -> type[CalloutServer]:
    """The server class of ``examples/<name>``, as ``calloutkit serve`` finds it."""
    server_class = load_target(str(EXAMPLES / name))
    assert issubclass(server_class, CalloutServer)
    return server_class


def load_module(relative: str) -> Any:
    """Import a helper file shipped with an example, e.g. ``jwt_auth/mint_token.py``."""
    path = EXAMPLES / relative
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def request_as_host(port: int, host: str, path: str = "/",
                    headers: Iterable[tuple[str, str]] = ()) -> HttpResponse:
    """A GET whose ``Host`` names another site while connecting to 127.0.0.1:``port``."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers),
             "Connection: close"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        with sock.makefile("rb") as rfile:
            start, response_headers = read_head(rfile)
            body, trailers = read_body(rfile, response_headers, until_close=True)
    return HttpResponse(int(start.split(" ")[1]), response_headers, body, trailers)


class ServerLoop:
    """An event loop in a daemon thread, for servers that tests drive synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="example-servers",
                                        daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def find_route(config: dict[str, Any], example: str) -> dict[str, Any]:
    """The route of ``example`` in a `Gateway` config (for a test's ``configure`` hook)."""
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    for route in hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]:
        headers = route["match"].get("headers", [])
        if headers and headers[0]["string_match"]["exact"] == example:
            return dict(route)
    raise KeyError(example)


def http_filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The HTTP filter chain of a `Gateway` config (ext_proc, then the router)."""
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters: list[dict[str, Any]] = hcm["typed_config"]["http_filters"]
    return filters


def gateway_config(callouts: Mapping[str, int], upstream_port: int,
                   **options: Any) -> dict[str, Any]:
    """`envoy_config` with one callout cluster and one route per example."""
    first = next(iter(callouts.values()))
    config = envoy_config(first, upstream_port, **options)
    clusters = config["static_resources"]["clusters"]
    template = next(c for c in clusters if c["name"] == "callout")
    routes: list[dict[str, Any]] = []
    for name, port in callouts.items():
        cluster = copy.deepcopy(template)
        cluster["name"] = cluster["load_assignment"]["cluster_name"] = f"callout_{name}"
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"]["socket_address"]["port_value"] = port
        clusters.append(cluster)
        routes.append({
            "match": {"prefix": "/", "headers": [{"name": "x-example",
                                                  "string_match": {"exact": name}}]},
            "route": {"cluster": "upstream", "timeout": "60s"},
            "typed_per_filter_config": {_EXT_PROC: {"@type": _PER_ROUTE, "overrides": {
                "grpc_service": {"envoy_grpc": {"cluster_name": f"callout_{name}"}}}}}})
    # requests naming no example reach the upstream without any callout
    routes.append({"match": {"prefix": "/"}, "route": {"cluster": "upstream"},
                   "typed_per_filter_config": {_EXT_PROC: {"@type": _PER_ROUTE,
                                                           "disabled": True}}})
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"] = routes
    return config


class Gateway:
    """Examples behind one real Envoy, routed by the ``x-example`` header.

    ``examples`` maps each example name to extra constructor arguments; ``external`` maps
    names to the plaintext ports of callouts running elsewhere (a subprocess);
    ``configure(config)`` may edit the Envoy config before Envoy starts; other keyword
    arguments go to `envoy_config`.
    """

    def __init__(self, examples: Mapping[str, Mapping[str, Any]] | Iterable[str], *,
                 external: Mapping[str, int] | None = None,
                 configure: Callable[[dict[str, Any]], None] | None = None,
                 **envoy_options: Any) -> None:
        self.wanted = (dict(examples) if isinstance(examples, Mapping)
                       else {name: {} for name in examples})
        self.external = dict(external or {})
        self.configure = configure
        self.envoy_options = envoy_options
        self.servers: dict[str, CalloutServer] = {}
        self.loop: ServerLoop | None = None
        self.upstream = UpstreamServer()
        self._upstream_running = False
        self.envoy: Envoy | None = None

    def __enter__(self) -> Gateway:
        try:
            self.loop = ServerLoop()
            for name, kwargs in self.wanted.items():
                server = load_example(name)(**LOOPBACK, **kwargs)
                self.loop.run(server.start())
                self.servers[name] = server
            self.upstream.start()
            self._upstream_running = True
            ports = {name: s.plaintext_port or 0 for name, s in self.servers.items()}
            config = gateway_config({**ports, **self.external}, self.upstream.port,
                                    **self.envoy_options)
            if self.configure is not None:
                self.configure(config)
            self.envoy = Envoy(config).start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.envoy is not None:
            self.envoy.stop()
        if self._upstream_running:  # stopping one that never started would wait forever
            self.upstream.stop()
        if self.loop is not None:
            for server in self.servers.values():
                self.loop.run(server.stop(grace=1))
            self.loop.close()

    def request(self, example: str, path: str = "/", method: str = "GET",
                headers: Iterable[tuple[str, str]] = (), body: bytes | str | None = None,
                *, host: str | None = None, **kwargs: Any) -> HttpResponse:
        """Send one HTTP request through Envoy to ``example``'s route (as ``host`` if given:
        a GET with that ``Host`` header)."""
        assert self.envoy is not None
        if host is not None:
            return request_as_host(self.envoy.port, host, path,
                                   [("x-example", example), *headers])
        return http_request(self.envoy.url + path, method,
                            [("x-example", example), *headers], body, **kwargs)

    def seen(self) -> dict[str, Any]:
        """The last request the upstream received, as it received it."""
        return self.upstream.requests[-1]

    def seen_lines(self, name: str) -> list[str]:
        """Every value of request header ``name`` the upstream last received, in order."""
        return [v for k, v in self.seen()["header_lines"] if k == name]

    def stats(self) -> dict[str, int]:
        assert self.envoy is not None
        return self.envoy.stats()


# -- the harness's own tests ------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_examples(server_transport: str | None) -> Iterable[Gateway]:
    with Gateway(["add_header", "update_header"]) as gateway:
        yield gateway


def test_each_route_reaches_its_own_callout(two_examples: Gateway) -> None:
    added = two_examples.request("add_header", headers=[("header-request", "client")])
    assert added.status == 200
    assert two_examples.seen_lines("header-request") == ["client", "request"]

    updated = two_examples.request("update_header", headers=[("header-request", "client")])
    assert updated.status == 200
    assert two_examples.seen_lines("header-request") == ["request-new-value"]


def test_requests_without_an_example_skip_the_callouts(two_examples: Gateway) -> None:
    before = two_examples.stats().get("http.ingress_http.ext_proc.streams_started", 0)
    assert two_examples.envoy is not None
    response = http_request(f"{two_examples.envoy.url}/plain")
    assert response.status == 200
    assert "header-request" not in two_examples.seen()["headers"]
    assert response.header("header-response") is None
    assert two_examples.stats().get("http.ingress_http.ext_proc.streams_started", 0) == before
