"""The ext_authz examples, each behind a real Envoy ext_authz filter and an echoing upstream."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from authz_harness import envoy_for, get  # noqa: F401 (a fixture)
from conftest import LOOPBACK, REPO

from calloutkit.cli._loader import load_target
from calloutkit.testing import Envoy

pytestmark = pytest.mark.envoy


@pytest.fixture
def example(envoy_for: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``await example(name, **environment)``: the example's server behind a real Envoy."""
    async def start(name: str, **environ: str) -> Envoy:
        for key, value in environ.items():
            monkeypatch.setenv(key, value)
        return await envoy_for(load_target(os.path.join(REPO, "examples", name))(**LOOPBACK))

    return start


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
