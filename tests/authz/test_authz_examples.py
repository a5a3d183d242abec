"""The ext_authz examples, each behind a real Envoy ext_authz filter and an echoing upstream."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from conftest import LOOPBACK, REPO

from calloutkit.cli._loader import load_target
from calloutkit.testing import Envoy, UpstreamServer, authz_envoy_config, http_request

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        yield server


@pytest.fixture
async def example(upstream: UpstreamServer, monkeypatch) -> AsyncIterator[Any]:
    running: list[tuple[Any, Envoy]] = []

    async def start(name: str, **environ: str) -> Envoy:
        for key, value in environ.items():
            monkeypatch.setenv(key, value)
        server = load_target(os.path.join(REPO, "examples", name))(**LOOPBACK)
        await server.start()
        envoy = Envoy(authz_envoy_config(server.plaintext_port, upstream.port))
        running.append((server, envoy))
        return await asyncio.to_thread(envoy.start)

    yield start
    for server, envoy in running:
        envoy.stop()
        await server.stop(1)


async def get(envoy: Envoy, path: str, headers: list[tuple[str, str]] | None = None) -> Any:
    return await asyncio.to_thread(http_request, envoy.url + path, "GET", headers or [])


async def test_block_ip_refuses_blocked_networks_only(example) -> None:
    envoy = await example("authz_block_ip", BLOCKED_NETWORKS="10.0.0.0/24, 2001:db8::/32")
    r = await get(envoy, "/")  # from 127.0.0.1, the connection's address
    assert r.status == 200
    assert json.loads(r.body)["headers"]["x-client-ip-allowed"] == "true"
    for forwarded in ("10.0.0.5", "10.0.0.200, 192.0.2.1", "2001:db8::1", "not-an-ip"):
        r = await get(envoy, "/", [("x-forwarded-for", forwarded)])
        assert r.status == 403, forwarded
        assert r.header("x-client-ip-allowed") == "false"
    r = await get(envoy, "/", [("x-forwarded-for", "10.0.1.5")])
    assert r.status == 200


async def test_header_allowlist_names_the_caller_and_drops_the_key(example) -> None:
    envoy = await example("authz_header_allowlist", API_KEYS="k-ada=ada,k-bob=bob")
    r = await get(envoy, "/orders", [("x-api-key", "k-bob"), ("x-caller", "forged")])
    assert r.status == 200
    seen = json.loads(r.body)["headers"]
    assert seen["x-caller"] == "bob" and "x-api-key" not in seen
    assert r.header("x-authz") == "allowed"
    for headers in ([], [("x-api-key", "k-eve")]):
        r = await get(envoy, "/orders", headers)
        assert r.status == 401
        assert r.header("www-authenticate") == "ApiKey"
        assert json.loads(r.body) == {"error": "a valid x-api-key header is required"}
    assert (await get(envoy, "/healthz")).status == 200
