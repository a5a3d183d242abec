"""What the ext_authz tests through Envoy share: an AuthzServer behind a real Envoy
ext_authz filter in front of the suite's echoing upstream, and requests through it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from calloutkit import AuthzServer
from calloutkit.testing import Envoy, UpstreamServer, authz_envoy_config, http_request


@pytest.fixture
async def envoy_for(upstream: UpstreamServer) -> AsyncIterator[Any]:
    """``await envoy_for(server, **authz_envoy_config options)``: started, stopped after."""
    running: list[tuple[AuthzServer, Envoy]] = []

    async def start(server: AuthzServer, **options: Any) -> Envoy:
        await server.start()
        assert server.plaintext_port is not None
        envoy = Envoy(authz_envoy_config(server.plaintext_port, upstream.port, **options))
        running.append((server, envoy))
        return await asyncio.to_thread(envoy.start)

    yield start
    for server, envoy in running:
        envoy.stop()
        await server.stop(1)


async def get(envoy: Envoy, path: str, headers: list[tuple[str, str]] | None = None,
              method: str = "GET", body: str | None = None) -> Any:
    return await asyncio.to_thread(http_request, envoy.url + path, method, headers or [], body)
