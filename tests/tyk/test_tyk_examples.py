"""The Tyk examples, each loaded as ``calloutkit serve`` loads it, driven over real gRPC."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from calloutkit.cli._loader import load_target
from calloutkit.tyk import Hook, Object, SessionState, TykPluginServer
from calloutkit.tyk.testing import Gateway, HttpRequest, HttpResponse, event_payload

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LOCAL = {"plaintext_address": ("127.0.0.1", 0), "combined_health_check": True}


@asynccontextmanager
async def example(name: str, **gateway: Any) -> AsyncIterator[Gateway]:
    server_class = load_target(str(EXAMPLES / f"tyk_{name}"))
    assert issubclass(server_class, TykPluginServer)
    server = server_class(**LOCAL)
    await server.start()
    try:
        async with Gateway(f"tcp://127.0.0.1:{server.plaintext_port}", **gateway) as client:
            yield client
    finally:
        await server.stop(1)


# -- logging --------------------------------------------------------------------------------


async def test_logging_prints_each_object_as_json_and_changes_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    payload = json_format.Parse((EXAMPLES / "tyk_logging" / "petstore_response.json").read_text(),
                                Object())
    with caplog.at_level(logging.INFO, "tyk_logging"):
        async with example("logging", api_id="pets") as gateway:
            returned = await gateway.dispatch(payload)
            pre = await gateway.request_hook(Hook.PRE, "MyPreRequestPlugin",
                                             HttpRequest("GET", "/pet/findByStatus?status=sold"))
            await gateway.dispatch_event(event_payload("AuthFailure", api_id="pets"))
    payload.request.ClearField("body")
    payload.response.ClearField("body")  # the gateway reads raw_body only
    assert returned == payload
    assert pre.returned.request.return_overrides.response_code == -1 and not pre.stopped
    messages = [r.getMessage() for r in caplog.records if r.name == "tyk_logging"]
    assert messages[0].startswith("Response plugin 'MyResponsePlugin' from API "
                                  "ce6528c0af7b43206b9cf736a5e5d1b4\n{")
    logged = json.loads(messages[0].split("\n", 1)[1])
    assert logged["response"]["statusCode"] == 301 and logged["hookType"] == "Response"
    assert messages[1].startswith("Pre plugin 'MyPreRequestPlugin' from API pets\n")
    assert messages[2].startswith("event AuthFailure from API pets")


# -- header injection -----------------------------------------------------------------------


async def test_header_injection_pre_and_post_key_auth() -> None:
    async with example("header_injection", api_id="pets") as gateway:
        fresh = await gateway.request_hook(Hook.PRE, "AddCorrelationId", HttpRequest(
            "GET", "/pets", [("X-Internal-Debug", "1")]))
        kept = await gateway.request_hook(Hook.PRE, "AddCorrelationId", HttpRequest(
            "GET", "/pets", [("X-Request-Id", "client-id")]))
        session = SessionState(metadata={"tenant": "acme", "plan": "gold"})
        after_auth = await gateway.request_hook(
            Hook.POST_KEY_AUTH, "ForwardKeyMetadata",
            HttpRequest("GET", "/pets?api_key=secret&limit=5", [("Authorization", "secret")]),
            session=session)
    assert re.fullmatch(r"[0-9a-f-]{36}", fresh.request.header("X-Request-Id") or "")
    assert fresh.request.header("X-Api-Id") == "pets"
    assert fresh.request.header("X-Internal-Debug") is None
    assert kept.request.header("X-Request-Id") == "client-id"
    upstream = after_auth.request
    assert (upstream.header("X-Tenant"), upstream.header("X-Plan")) == ("acme", "gold")
    assert upstream.header("Authorization") is None
    assert upstream.query == [("limit", "5")]


# -- auth check -----------------------------------------------------------------------------


async def test_auth_check_accepts_known_keys_with_a_session_and_quota() -> None:
    async with example("auth_check", api_id="pets", org_id="org1") as gateway:
        gold = await gateway.request_hook("auth_check", "ApiKeyAuth", HttpRequest(
            headers=[("X-Api-Key", "demo-gold-key")]))
        bearer = await gateway.request_hook("auth_check", "ApiKeyAuth", HttpRequest(
            headers=[("Authorization", "Bearer demo-free-key")]))
    assert not gold.stopped and gold.key == "acct-1001"
    session = gold.session
    assert (session.rate, session.per, session.quota_max, session.quota_renewal_rate) == (
        100, 1, 100_000, 86_400)
    assert session.id_extractor_deadline > time.time() + 30
    assert session.metadata["owner"] == "alice@example.com"
    assert session.last_updated == "2024-01-01T00:00:00Z" and session.org_id == "org1"
    assert bearer.key == "acct-1002" and bearer.session.quota_max == 1_000


@pytest.mark.parametrize("headers", [[], [("X-Api-Key", "nope")],
                                     [("Authorization", "Basic demo-gold-key")]])
async def test_auth_check_rejects_unknown_keys_with_401(headers: list[tuple[str, str]]) -> None:
    async with example("auth_check") as gateway:
        outcome = await gateway.request_hook("auth_check", "ApiKeyAuth", HttpRequest(
            headers=headers))
    assert outcome.response is not None and outcome.response.status == 401
    assert outcome.response.json() == {"error": "missing or unknown API key"}
    assert outcome.response.header("WWW-Authenticate") == "ApiKey"
    assert outcome.session is None


async def test_auth_check_is_cached_by_the_id_extractor() -> None:
    async with example("auth_check", id_extractor="X-Api-Key") as gateway:
        request = HttpRequest(headers=[("X-Api-Key", "demo-gold-key")])
        first = await gateway.request_hook("auth_check", "ApiKeyAuth", request)
        second = await gateway.request_hook("auth_check", "ApiKeyAuth", request)
    assert first.dispatched and not second.dispatched and second.key == first.key


# -- rejection ------------------------------------------------------------------------------


async def test_reject_blocks_paths_with_tyks_json_error() -> None:
    async with example("reject") as gateway:
        outcome = await gateway.request_hook(Hook.PRE, "GuardRequests",
                                             HttpRequest("GET", "/admin/users"))
    assert outcome.response is not None and outcome.response.status == 403
    assert outcome.response.json() == {"error": "/admin/users is not served through this gateway"}
    assert outcome.events == ["AuthFailure"]


@pytest.mark.parametrize(("method", "body", "status", "expected"), [
    ("DELETE", b"", 405, {"error": "method not allowed", "allowed": ["GET", "HEAD", "POST"]}),
    ("POST", b"{oops", 400, None),
    ("POST", b'{"item": "x"}', 422, {"error": "invalid order", "missing": ["quantity"]}),
])
async def test_reject_answers_with_its_own_json(method: str, body: bytes, status: int,
                                               expected: Any) -> None:
    async with example("reject") as gateway:
        outcome = await gateway.request_hook(Hook.PRE, "GuardRequests", HttpRequest(
            method, "/orders", [("Content-Type", "application/json")], body))
    assert outcome.response is not None and outcome.response.status == status
    assert outcome.response.header("Content-Type") == "application/json"
    assert outcome.events == []
    data = outcome.response.json()
    if expected is None:
        assert data["error"] == "body is not JSON" and data["detail"]
    else:
        assert data == expected
    if status == 405:
        assert outcome.response.header("Allow") == "GET, HEAD, POST"


async def test_reject_lets_good_requests_through() -> None:
    async with example("reject") as gateway:
        outcome = await gateway.request_hook(Hook.PRE, "GuardRequests", HttpRequest(
            "POST", "/orders", [("Content-Type", "application/json")],
            b'{"item": "x", "quantity": 2}'))
    assert not outcome.stopped and outcome.request.body == b'{"item": "x", "quantity": 2}'


# -- response transform ---------------------------------------------------------------------


async def test_response_transform_wraps_json_with_consistent_content_length() -> None:
    upstream = HttpResponse(200, [("Content-Type", "application/json"), ("Server", "nginx"),
                                  ("Content-Length", "6"), ("Set-Cookie", "a=1"),
                                  ("Set-Cookie", "b=2")], b"[1, 2]")
    async with example("response_transform", api_id="pets") as gateway:
        outcome = await gateway.response_hook("EnvelopeResponse", HttpRequest(), upstream)
    response = outcome.response
    assert response is not None and response.status == 200
    assert response.json() == {"data": [1, 2], "meta": {"api": "pets", "status": 200}}
    assert response.header("Content-Length") == str(len(response.body))
    assert response.header("X-Transformed") == "envelope" and response.header("Server") is None
    assert response.header_values("Set-Cookie") == ["a=1", "b=2"]
    returned = outcome.returned.response  # what a gateway older than 5.8 would send as is
    assert returned.headers["Content-Length"] == str(len(returned.raw_body))


@pytest.mark.parametrize("upstream", [
    HttpResponse(200, [("Content-Type", "text/html")], b"<p>hi</p>"),
    HttpResponse(502, [("Content-Type", "application/json")], b"not json"),
])
async def test_response_transform_leaves_other_bodies_alone(upstream: HttpResponse) -> None:
    async with example("response_transform") as gateway:
        sent_body = upstream.body
        outcome = await gateway.response_hook("EnvelopeResponse", HttpRequest(), upstream)
        assert outcome.response is not None and outcome.response.body == sent_body
        assert outcome.response.status == upstream.status


# -- event logger ---------------------------------------------------------------------------


async def test_event_logger_logs_by_type_and_audits_by_handler_name(
        caplog: pytest.LogCaptureFixture) -> None:
    meta = {"Message": "Auth Failure", "Path": "/pets", "Origin": "203.0.113.7",
            "Key": "demo-gold-key", "OriginatingRequest": "R0VUIC8gSFRUUC8xLjENCg=="}
    with caplog.at_level(logging.INFO, "tyk_events"):
        async with example("event_logger") as gateway:
            await gateway.dispatch_event(event_payload("AuthFailure", meta, handler_name="audit",
                                                       api_id="pets", org_id="o"))
            await gateway.dispatch_event(event_payload("QuotaExceeded", {"Key": "k"},
                                                       api_id="pets"))
    records = [(r.name, r.levelname, r.getMessage()) for r in caplog.records
               if r.name.startswith("tyk_events")]
    assert records[0] == ("tyk_events", "WARNING", "auth failure on API pets: Auth Failure "
                          "/pets from 203.0.113.7 (key demo...)")
    name, level, text = records[1]
    assert (name, level) == ("tyk_events.audit", "INFO")
    audited = json.loads(text)
    assert audited["type"] == "AuthFailure" and audited["meta"]["Key"] == "demo..."
    assert "OriginatingRequest" not in audited["meta"]
    assert records[2] == ("tyk_events", "WARNING", "QuotaExceeded on API pets for key ****")
    assert "demo-gold-key" not in caplog.text


@pytest.mark.no_server
def test_every_example_folder_has_a_test() -> None:
    tested = {"logging", "header_injection", "auth_check", "reject", "response_transform",
              "event_logger"}
    found = {p.name.removeprefix("tyk_") for p in EXAMPLES.glob("tyk_*") if p.is_dir()}
    assert found == tested
