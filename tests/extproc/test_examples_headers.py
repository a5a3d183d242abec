"""Header-phase examples behind one real Envoy (bodies NONE unless an example overrides).

add_header, update_header, normalize_header, redirect, set_cookie, dynamic_forwarding,
metadata, jwt_auth and json_only_buffering, each asserted from the client's and the upstream's
side.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_examples_harness import Gateway, find_route, load_example, load_module

from calloutkit import ConfigError
from calloutkit.testing import UpstreamServer

pytestmark = pytest.mark.envoy

FORWARDING_NS = "com.google.envoy.dynamic_forwarding.selected_endpoints"
TEST_NS = "calloutkit.test"
EXT_PROC = "http.ingress_http.ext_proc."

mint_token = load_module("jwt_auth/mint_token.py")


@pytest.fixture(scope="module")
def jwt_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("jwt")
    private, _ = mint_token.ensure_keys(folder)
    other_private, _ = mint_token.generate_keys()  # signs tokens the server must reject
    return {"private": private, "other_private": other_private,
            "public_path": folder / "public.pem"}


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, UpstreamServer]]:
    """Three upstreams the dynamic_forwarding example chooses between."""
    with UpstreamServer() as blue, UpstreamServer() as green, UpstreamServer() as fallback:
        yield {"blue": blue, "green": green, "fallback": fallback}


def _forwarding_cluster(config: dict[str, Any], backends: dict[str, UpstreamServer]) -> None:
    """Route dynamic_forwarding's requests to a cluster that obeys the selected endpoint."""
    clusters = config["static_resources"]["clusters"]
    cluster = json.loads(json.dumps(next(c for c in clusters if c["name"] == "upstream")))
    cluster["name"] = cluster["load_assignment"]["cluster_name"] = "forwarding"
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                     "port_value": b.port}}}}
        for b in backends.values()]
    cluster["load_balancing_policy"] = {"policies": [{"typed_extension_config": {
        "name": "envoy.load_balancing_policies.override_host",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies."
                     "override_host.v3.OverrideHost",
            "override_host_sources": [{"metadata": {"key": FORWARDING_NS,
                                                    "path": [{"key": "primary"}]}}],
            "fallback_policy": {"policies": [{"typed_extension_config": {
                "name": "envoy.load_balancing_policies.round_robin",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions."
                                          "load_balancing_policies.round_robin.v3.RoundRobin"},
            }}]}}}}]}
    clusters.append(cluster)
    find_route(config, "dynamic_forwarding")["route"]["cluster"] = "forwarding"


@pytest.fixture(scope="module")
def gateway(server_transport: str | None, jwt_keys: dict[str, Any],
            backends: dict[str, UpstreamServer]) -> Iterator[Gateway]:
    examples = {
        "add_header": {}, "update_header": {}, "normalize_header": {}, "redirect": {},
        "set_cookie": {}, "metadata": {}, "json_only_buffering": {},
        "jwt_auth": {"public_key_path": jwt_keys["public_path"]},
        "dynamic_forwarding": {
            "backends": {"blue": f"127.0.0.1:{backends['blue'].port}",
                         "green": f"127.0.0.1:{backends['green'].port}"},
            "fallback": f"127.0.0.1:{backends['fallback'].port}"},
    }
    with Gateway(examples, configure=lambda c: _forwarding_cluster(c, backends),
                 metadata={TEST_NS: {"tenant": "acme", "tier": 3}},
                 forwarding_namespaces=[TEST_NS],
                 receiving_namespaces=[FORWARDING_NS]) as gw:
        yield gw


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name]


# -- add_header / update_header ------------------------------------------------------------

def test_add_header_appends_both_ways_and_removes_foo(gateway: Gateway) -> None:
    response = gateway.request("add_header", headers=[
        ("header-request", "client"), ("foo", "secret"),
        ("x-echo-header", "header-response=upstream")])
    assert response.status == 200
    assert gateway.seen_lines("header-request") == ["client", "request"]
    assert "foo" not in gateway.seen()["headers"]
    assert values(response.headers, "header-response") == ["upstream", "response"]


def test_update_header_leaves_exactly_one_value(gateway: Gateway) -> None:
    response = gateway.request("update_header", headers=[
        ("header-request", "client"), ("x-echo-header", "header-response=upstream")])
    assert response.status == 200
    assert gateway.seen_lines("header-request") == ["request-new-value"]
    assert values(response.headers, "header-response") == ["response-new-value"]

    gateway.request("update_header")
    assert gateway.seen_lines("header-request") == ["request-new-value"]  # added when absent


# -- normalize_header ----------------------------------------------------------------------

@pytest.mark.parametrize(("user_agent", "expected"), [
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile/15E148", "mobile"),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8) Mobile Safari/537.36", "mobile"),
    ("Mozilla/5.0 (Linux; Android 14; SM-X910) Safari/537.36", "tablet"),
    ("Mozilla/5.0 (iPad; CPU OS 17_0 like Mac OS X)", "tablet"),
    ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "bot"),
    ("Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0", "desktop"),
])
def test_normalize_header_classifies_the_user_agent(gateway: Gateway, user_agent: str,
                                                     expected: str) -> None:
    response = gateway.request("normalize_header", headers=[("user-agent", user_agent)])
    assert response.status == 200
    assert gateway.seen_lines("client-device-type") == [expected]


def test_normalize_header_trusts_the_host_and_overwrites_a_spoofed_value(
        gateway: Gateway) -> None:
    response = gateway.request("normalize_header", host="m.shop.example", headers=[
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64)"), ("client-device-type", "bot")])
    assert response.status == 200
    assert gateway.seen()["headers"]["host"] == "m.shop.example"
    assert gateway.seen_lines("client-device-type") == ["mobile"]


# -- redirect ------------------------------------------------------------------------------

def test_redirect_answers_301_without_calling_the_upstream(gateway: Gateway) -> None:
    before = len(gateway.upstream.requests)
    response = gateway.request("redirect", "/docs/page?lang=en")
    assert response.status == 301
    assert response.header("location") == "https://www.calloutkit.example/docs/page?lang=en"
    assert response.body == b"moved to https://www.calloutkit.example/docs/page?lang=en\n"
    assert len(gateway.upstream.requests) == before


@pytest.mark.no_server
def test_redirect_rejects_a_target_that_is_not_a_url() -> None:
    with pytest.raises(ConfigError, match="REDIRECT_TO must be an http"):
        load_example("redirect")(plaintext_address=("127.0.0.1", 0), disable_tls=True,
                                 redirect_to="www.example.com")


# -- set_cookie ----------------------------------------------------------------------------

def test_set_cookie_only_when_the_request_asks(gateway: Gateway) -> None:
    plain = gateway.request("set_cookie")
    assert plain.status == 200
    assert values(plain.headers, "set-cookie") == []

    asked = gateway.request("set_cookie", headers=[
        ("cookie-check", "1"), ("x-echo-header", "set-cookie=upstream=1")])
    assert asked.status == 200
    cookies = values(asked.headers, "set-cookie")
    assert cookies[0] == "upstream=1"  # the upstream's own cookie is kept
    assert len(cookies) == 2 and cookies[1].startswith("calloutkit_session=")
    assert cookies[1].endswith("; Max-Age=3600; Path=/; HttpOnly; Secure; SameSite=Lax")


# -- dynamic_forwarding --------------------------------------------------------------------

def test_dynamic_forwarding_sends_each_request_to_the_selected_endpoint(
        gateway: Gateway, backends: dict[str, UpstreamServer]) -> None:
    def served_by(*headers: tuple[str, str]) -> str:
        counts = {name: len(b.requests) for name, b in backends.items()}
        response = gateway.request("dynamic_forwarding", headers=headers)
        assert response.status == 200
        grown = [name for name, b in backends.items() if len(b.requests) > counts[name]]
        assert len(grown) == 1
        return grown[0]

    assert served_by(("x-backend", "green")) == "green"
    assert served_by(("x-backend", "blue")) == "blue"
    assert served_by(("x-backend", "green")) == "green"
    assert served_by(("x-backend", f"127.0.0.1:{backends['blue'].port}")) == "blue"
    assert served_by(("x-backend", "10.9.9.9:80")) == "fallback"  # never a made-up address
    assert served_by(("x-backend", "purple")) == "fallback"
    assert served_by() == "fallback"


# -- metadata ------------------------------------------------------------------------------

def test_metadata_reflects_forwarded_namespaces(gateway: Gateway) -> None:
    response = gateway.request("metadata")
    assert response.status == 200
    expected = {TEST_NS: {"tenant": "acme", "tier": 3}}
    assert json.loads(gateway.seen()["headers"]["x-forwarded-metadata"]) == expected
    assert json.loads(response.header("x-forwarded-metadata") or "") == expected


# -- jwt_auth ------------------------------------------------------------------------------

def test_jwt_auth_passes_claims_on_as_headers(gateway: Gateway,
                                               jwt_keys: dict[str, Any]) -> None:
    token = mint_token.mint(jwt_keys["private"], {"sub": "alice", "role": "admin",
                                                  "groups": ["ops", "dev"]})
    response = gateway.request("jwt_auth", headers=[
        ("authorization", f"Bearer {token}"), ("decoded-admin", "true"),
        ("decoded-sub", "mallory")])
    assert response.status == 200
    seen = gateway.seen()["headers"]
    assert seen["decoded-sub"] == "alice"
    assert gateway.seen_lines("decoded-sub") == ["alice"]
    assert seen["decoded-role"] == "admin"
    assert seen["decoded-groups"] == '["ops","dev"]'
    assert seen["decoded-exp"].isdigit()
    assert "decoded-admin" not in seen  # a claim the token does not have cannot be smuggled


@pytest.mark.parametrize("case", ["missing", "expired", "bad signature", "garbage"])
def test_jwt_auth_rejects_bad_tokens_with_401(gateway: Gateway, jwt_keys: dict[str, Any],
                                              case: str) -> None:
    tokens = {
        "missing": None,
        "expired": mint_token.mint(jwt_keys["private"], {"sub": "alice"}, expires_in=-60),
        "bad signature": mint_token.mint(jwt_keys["other_private"], {"sub": "alice"}),
        "garbage": "not.a.token",
    }
    token = tokens[case]
    headers = [("authorization", f"Bearer {token}")] if token else []
    before = len(gateway.upstream.requests)
    response = gateway.request("jwt_auth", headers=headers)
    assert response.status == 401
    assert (response.header("www-authenticate") or "").startswith("Bearer error=")
    error = json.loads(response.body)
    assert error["error"] == ("invalid_request" if case == "missing" else "invalid_token")
    assert len(gateway.upstream.requests) == before


@pytest.mark.no_server
def test_jwt_auth_needs_its_public_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mint_token\.py"):
        load_example("jwt_auth")(plaintext_address=("127.0.0.1", 0), disable_tls=True,
                                 public_key_path=tmp_path / "missing.pem")


# -- json_only_buffering -------------------------------------------------------------------

def _messages(gateway: Gateway) -> int:
    return gateway.stats().get(EXT_PROC + "stream_msgs_sent", 0)


def test_json_only_buffering_redacts_json_request_bodies(gateway: Gateway) -> None:
    before = _messages(gateway)
    body = json.dumps({"user": "alice", "password": "hunter2",
                       "profile": {"api_key": "k-123", "city": "Paris"}})
    response = gateway.request("json_only_buffering", "/signup", "POST", [
        ("content-type", "application/json")], body)
    assert response.status == 200
    seen = gateway.seen()
    assert json.loads(seen["body"]) == {"user": "alice", "password": "[redacted]",
                                        "profile": {"api_key": "[redacted]", "city": "Paris"}}
    assert seen["headers"]["content-length"] == str(seen["body_length"])
    assert seen["headers"]["x-redacted"] == "api_key,password"
    # request headers, request body, response headers, response body (the echo is JSON)
    assert _messages(gateway) - before == 4


def test_json_only_buffering_rejects_invalid_json(gateway: Gateway) -> None:
    before = len(gateway.upstream.requests)
    response = gateway.request("json_only_buffering", "/signup", "POST", [
        ("content-type", "application/json")], '{"user": ')
    assert response.status == 400
    assert json.loads(response.body) == {"error": "request body is not valid JSON"}
    assert len(gateway.upstream.requests) == before


def test_json_only_buffering_never_sees_other_bodies(gateway: Gateway) -> None:
    before = _messages(gateway)
    body = "password=hunter2&user=alice"
    response = gateway.request("json_only_buffering", "/form", "POST", [
        ("content-type", "application/x-www-form-urlencoded"), ("x-echo-raw", "1")], body)
    assert response.status == 200
    assert gateway.seen()["body"] == body
    assert response.body == body.encode()
    assert _messages(gateway) - before == 2  # the two header messages, no body


def test_json_only_buffering_redacts_json_responses(gateway: Gateway) -> None:
    # The echo upstream answers JSON that repeats the request headers, credentials included.
    response = gateway.request("json_only_buffering", "/me", headers=[
        ("authorization", "Bearer abc.def")])
    assert response.status == 200
    assert gateway.seen()["headers"]["authorization"] == "Bearer abc.def"
    echoed = json.loads(response.body)
    assert echoed["headers"]["authorization"] == "[redacted]"
    assert response.header("x-redacted") == "authorization"
    assert response.header("content-length") == str(len(response.body))
