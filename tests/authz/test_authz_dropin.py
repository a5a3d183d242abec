"""A block-IP server written the way the documented callout API's example is (subclass
``CalloutServerAuth``, read the raw ``CheckRequest``, return None to allow), behind a real
Envoy ext_authz filter."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Iterator

import pytest
from conftest import LOOPBACK, running
from envoy.service.auth.v3 import external_auth_pb2 as auth_pb2
from envoy.type.v3 import http_status_pb2

from calloutkit import AuthzServer
from calloutkit.testing import Envoy, UpstreamServer, authz_envoy_config, http_request
from extauthz.service.callout_server import CalloutServerAuth, _addr_to_str
from extauthz.service.callout_tools import allow_request, deny_request


class CalloutServerExample(CalloutServerAuth):
    BLOCKED_IP_RANGE = ipaddress.ip_network("10.0.0.0/24")

    def on_check(self, request: auth_pb2.CheckRequest, context) -> auth_pb2.CheckResponse:
        assert isinstance(request, auth_pb2.CheckRequest)
        client_ip = self.extract_client_ip(request)
        if client_ip is None or ipaddress.ip_address(client_ip) in self.BLOCKED_IP_RANGE:
            return deny_request(status_code=http_status_pb2.StatusCode.Forbidden,
                                headers=[("x-client-ip-allowed", "false")])
        if client_ip == "192.0.2.9":
            return allow_request([("x-trusted", "yes")])
        return None

    def extract_client_ip(self, request: auth_pb2.CheckRequest) -> str | None:
        http = request.attributes.request.http
        for header in http.header_map.headers:
            if header.key.lower() == "x-forwarded-for":
                return str(header.raw_value.decode().split(",")[0].strip())
        forwarded = http.headers.get("x-forwarded-for", "")
        return forwarded.split(",")[0].strip() if forwarded else None


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        yield server


@pytest.mark.no_server
def test_the_names_are_calloutkits() -> None:
    assert issubclass(CalloutServerAuth, AuthzServer)
    assert _addr_to_str(("0.0.0.0", 443)) == "0.0.0.0:443"
    assert _addr_to_str(("::1", 8443)) == "[::1]:8443"
    assert deny_request().denied_response.status.code == 403


@pytest.mark.envoy
@pytest.mark.parametrize("raw_headers", [False, True])
async def test_a_reference_style_block_ip_server_behind_envoy(upstream, raw_headers) -> None:
    async with running(CalloutServerExample(**LOOPBACK)) as server:
        config = authz_envoy_config(server.plaintext_port, upstream.port,
                                    encode_raw_headers=raw_headers)
        with Envoy(config) as envoy:
            def get(forwarded: str | None):
                headers = [("x-forwarded-for", forwarded)] if forwarded else []
                return http_request(envoy.url + "/", "GET", headers)

            blocked = await asyncio.to_thread(get, "10.0.0.7, 192.0.2.1")
            assert blocked.status == 403
            assert blocked.header("x-client-ip-allowed") == "false"
            assert (await asyncio.to_thread(get, None)).status == 403  # no client IP
            allowed = await asyncio.to_thread(get, "192.0.2.1")
            assert allowed.status == 200 and json.loads(allowed.body)["path"] == "/"
            trusted = await asyncio.to_thread(get, "192.0.2.9")
            assert json.loads(trusted.body)["headers"]["x-trusted"] == "yes"
