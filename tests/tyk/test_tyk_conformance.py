"""Conformance with Tyk Gateway's coprocess rules, one test per case of the reference.

Each test runs a plugin in a TykPluginServer over real gRPC, and applies the returned Object
with `calloutkit.tyk.testing.Gateway`, the model of what the gateway reads back. Where the rule
is about the Object itself, the returned fields are asserted too, so a test does not lean on
the model alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import running

from calloutkit.tyk import Hook, Object, Plugin, PluginCall, SessionState, TykPluginServer
from calloutkit.tyk.testing import (
    Gateway,
    HttpRequest,
    HttpResponse,
    canonical_header_key,
    sync_multivalue_headers,
)

LOCAL = {"plaintext_address": ("127.0.0.1", 0), "combined_health_check": True}


# -- the plugins of Tyk's own gRPC test server, written with calloutkit's helpers -------------


def pre_hook1(call: PluginCall) -> None:
    call.request.set_header("Testheader", "testvalue")


def pre_hook2(call: PluginCall) -> None:
    """Tyk's "UTF-8/non-UTF-8 request data" check."""
    content_type = call.request.headers.get("Content-Type")
    raw = call.object.request
    if content_type is None:
        call.reject(400, "Content-Type missing")
    elif content_type == "application/json":
        if not (raw.body and raw.raw_body):
            call.reject(400, "expected body and raw_body")
    elif content_type.startswith("multipart/form-data"):
        if raw.body or not raw.raw_body:
            call.reject(400, "expected raw_body only")
    else:
        call.reject(400, "unexpected content type")


def post_hook1(call: PluginCall) -> None:
    session = call.session
    nested = json.loads(session.metadata["testkey"])
    if nested.get("nestedkey") != "nestedvalue" or session.metadata["testkey2"] != "testvalue":
        call.reject(400, "bad session metadata")
    if any(call.metadata[k] != v for k, v in session.metadata.items()):
        call.reject(400, "object metadata differs from session metadata")


def response_hook(call: PluginCall) -> None:
    call.object.response.raw_body = b"newbody"  # headers untouched, as in Tyk's test


def auth_hook1(call: PluginCall) -> None:
    token = call.request.headers.get("Authorization", "")
    call.metadata["token"] = token
    if token != "abc":
        call.reject(400, "invalid token")  # Tyk's test error helper: 400 + message
        return
    call.authorize(token, rate=100, id_extractor_deadline=int(time.time()) + 2,
                   metadata={"sessionMetaKey": "customAuthSessionMetaValue"})


def config_data_response_hook(call: PluginCall) -> None:
    value = "true" if call.config_data is not None else "false"
    call.object.response.headers["x-config-data"] = value
    call.object.response.multivalue_headers.add(key="x-config-data", values=[value])


class TykTestPlugins(TykPluginServer):
    plugins = [
        Plugin("testPreHook1", pre_hook1, hook=Hook.PRE),
        Plugin("testPreHook2", pre_hook2, hook=Hook.PRE),
        Plugin("testPostHook1", post_hook1, hook=Hook.POST),
        Plugin("testResponseHook", response_hook, hook=Hook.RESPONSE),
        Plugin("testAuthHook1", auth_hook1, hook=Hook.CUSTOM_KEY_CHECK),
        Plugin("testConfigDataResponseHook", config_data_response_hook, hook=Hook.RESPONSE),
        Plugin("", lambda call: None, hook=Hook.CUSTOM_KEY_CHECK),  # unnamed auth_check
    ]


@pytest.fixture
async def plugins() -> AsyncIterator[TykTestPlugins]:
    server = TykTestPlugins(**LOCAL)
    await server.start()
    yield server
    await server.stop(1)


def target(server: TykPluginServer) -> str:
    return f"tcp://127.0.0.1:{server.plaintext_port}"


# -- 11.1 Tyk's gRPC integration tests ---------------------------------------------------------


async def test_pre_hook_with_set_headers(plugins: TykPluginServer) -> None:
    async with Gateway(target(plugins), api_id="1") as gateway:
        outcome = await gateway.request_hook(Hook.PRE, "testPreHook1", HttpRequest(
            "GET", "/grpc-test-api/", [("Authorization", "key")]))
    assert dict(outcome.returned.request.set_headers) == {"Testheader": "testvalue"}
    assert not outcome.stopped
    assert outcome.request.header("Testheader") == "testvalue"


@pytest.mark.parametrize(("headers", "body", "raw_body_only"), [
    ([("Content-Type", "application/json")], b"{}", False),
    ([("Content-Type", "multipart/form-data; boundary=x")],
     b"--x\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n\xff\xfe\x00\x01\r\n"
     b"--x\r\nContent-Disposition: form-data; name=\"testfield\"\r\n\r\ntestvalue\r\n--x--\r\n",
     False),
])
async def test_pre_hook_with_utf8_and_non_utf8_request_data(
        plugins: TykPluginServer, headers: list[tuple[str, str]], body: bytes,
        raw_body_only: bool) -> None:
    async with Gateway(target(plugins), api_id="2") as gateway:
        outcome = await gateway.request_hook(Hook.PRE, "testPreHook2", HttpRequest(
            "POST", "/grpc-test-api-2/", headers, body))
        assert not outcome.stopped, outcome.response
        assert outcome.request.body == body
        missing = await gateway.request_hook(Hook.PRE, "testPreHook2", HttpRequest(
            "POST", "/grpc-test-api-2/", [], body))
        assert missing.response is not None and missing.response.status == 400


async def test_post_hook_with_metadata(plugins: TykPluginServer) -> None:
    session = SessionState(rate=10, metadata={
        "testkey": json.dumps({"nestedkey": "nestedvalue"}), "testkey2": "testvalue"})
    async with Gateway(target(plugins), api_id="3") as gateway:
        outcome = await gateway.request_hook(Hook.POST, "testPostHook1",
                                             HttpRequest("GET", "/grpc-test-api-3/"),
                                             session=session)
    assert not outcome.stopped, outcome.response
    assert outcome.returned.request.return_overrides.response_code == -1


async def test_response_hook(plugins: TykPluginServer) -> None:
    async with Gateway(target(plugins), api_id="4") as gateway:
        outcome = await gateway.response_hook(
            "testResponseHook", HttpRequest("GET", "/grpc-test-api-4/"),
            HttpResponse(200, [("Content-Type", "text/plain"), ("Content-Length", "5")],
                         b"hello"))
    assert outcome.response is not None
    assert (outcome.response.status, outcome.response.body) == (200, b"newbody")
    assert outcome.response.header("Content-Length") == "7"


async def test_auth_hook_with_id_extractor(plugins: TykPluginServer) -> None:
    async with Gateway(target(plugins), api_id="6", org_id="org",
                       id_extractor="Authorization") as gateway:
        outcome = await gateway.request_hook("auth_check", "testAuthHook1", HttpRequest(
            "GET", "/grpc-auth-hook-test-api-1/", [("Authorization", "abc")]))
        assert not outcome.stopped, outcome.response
        assert outcome.key is not None and outcome.key != "abc"
        assert outcome.key in gateway.sessions and outcome.session.rate == 100
        # Within id_extractor_deadline the gateway answers from its cache: no Dispatch.
        again = await gateway.request_hook("auth_check", "testAuthHook1", HttpRequest(
            "GET", "/grpc-auth-hook-test-api-1/", [("Authorization", "abc")]))
        assert (again.dispatched, again.stopped, again.key) == (False, False, outcome.key)


async def test_auth_hook_without_id_extractor(plugins: TykPluginServer) -> None:
    async with Gateway(target(plugins), api_id="7", org_id="org") as gateway:
        outcome = await gateway.request_hook("auth_check", "testAuthHook1", HttpRequest(
            "GET", "/grpc-auth-hook-test-api-2/", [("Authorization", "abc")]))
        assert not outcome.stopped
        assert outcome.key == "abc" and "abc" in gateway.sessions
        stored = gateway.sessions["abc"]
        assert stored.metadata["sessionMetaKey"] == "customAuthSessionMetaValue"
        assert stored.metadata["token"] == "abc" and stored.org_id == "org"
        assert stored.id_extractor_deadline > time.time()
        bad = await gateway.request_hook("auth_check", "testAuthHook1", HttpRequest(
            "GET", "/grpc-auth-hook-test-api-2/", [("Authorization", "wrong")]))
    assert bad.response is not None and bad.response.status == 400
    assert bad.response.json() == {"error": "invalid token"}
    assert bad.events == ["AuthFailure"]


async def test_ignore_cases_of_an_unnamed_auth_check(plugins: TykPluginServer) -> None:
    async with Gateway(target(plugins), api_id="ignore_plugin",
                       id_extractor="Authorization") as gateway:
        missing = await gateway.request_hook("auth_check", "", HttpRequest("GET", "/something"))
        assert missing.response is not None and missing.response.status == 400
        assert "Authorization field missing" in missing.response.body.decode()
        assert not missing.dispatched
        unchanged = await gateway.request_hook("auth_check", "", HttpRequest(
            "GET", "/something", [("authorization", "bad")]))
    # The plugin returned the Object unchanged: no session, no token.
    assert unchanged.response is not None and unchanged.response.status == 403
    assert unchanged.response.json() == {"error": "Forbidden"}


@pytest.mark.parametrize(("config_data", "expected"), [({"key": "value"}, "true"),
                                                       (None, "false")])
async def test_config_data(plugins: TykPluginServer, config_data: Any, expected: str) -> None:
    async with Gateway(target(plugins), api_id="8", config_data=config_data) as gateway:
        outcome = await gateway.response_hook(
            "testConfigDataResponseHook", HttpRequest("GET", "/grpc-config-data/"),
            HttpResponse(200, [("Content-Type", "text/plain")], b"ok"))
    assert outcome.response is not None
    assert outcome.response.header_values("X-Config-Data") == [expected]


# -- 11.2 target URLs --------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["tcp://127.0.0.1:{port}", "localhost:{port}",
                                  "dns:///127.0.0.1:{port}"])
async def test_target_forms(plugins: TykPluginServer, form: str) -> None:
    async with Gateway(form.format(port=plugins.plaintext_port)) as gateway:
        outcome = await gateway.request_hook(Hook.PRE, "testPreHook1", HttpRequest())
    assert outcome.request.header("Testheader") == "testvalue"


@pytest.mark.no_server
@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "[::1]:{port}", "://invalid"])
def test_targets_the_gateways_url_parse_refuses(form: str) -> None:
    # An IP literal without a scheme: Go's url.Parse fails, and Tyk starts with no plugin
    # server at all.
    with pytest.raises(ValueError, match=r"url\.Parse refuses it"):
        Gateway(form.format(port=1))


# -- 11.3 Response-hook header sync ------------------------------------------------------------

SYNC_CASES = {
    "adding": ({"Header1": "value1", "Header2": "value2"}, [("Header1", ["oldValue1"])],
               [("Header1", ["value1"]), ("Header2", ["value2"])]),
    "removing": ({"Header1": "value1"}, [("Header1", ["oldValue1"]), ("Header2", ["oldValue2"])],
                 [("Header1", ["value1"])]),
    "updating": ({"Header1": "newValue1"}, [("Header1", ["oldValue1"])],
                 [("Header1", ["newValue1"])]),
    "keeping multivalue": ({"Header": "newValue1"}, [("Header", ["oldValue1", "value2"])],
                           [("Header", ["newValue1", "value2"])]),
    "empty mv": ({"Header": "newValue1"}, [], [("Header", ["newValue1"])]),
    "set-cookie": ({"Set-Cookie": "session=abc123; Path=/"},
                   [("Set-Cookie", ["session=dce123; Path=/", "user=john; Path=/",
                                    "theme=dark; Path=/"])],
                   [("Set-Cookie", ["session=abc123; Path=/", "user=john; Path=/",
                                    "theme=dark; Path=/"])]),
}


@pytest.mark.parametrize("case", SYNC_CASES)
async def test_header_sync(case: str) -> None:
    returned, initial, expected = SYNC_CASES[case]
    assert sync_multivalue_headers(returned, initial) == expected

    def plugin(call: PluginCall) -> None:  # a plugin that edits only the headers map
        call.object.response.headers.clear()
        call.object.response.headers.update(returned)

    server = TykPluginServer(plugins=[Plugin("sync", plugin)], **LOCAL)
    await server.start()
    try:
        async with Gateway(server) as gateway:
            upstream = [(key, value) for key, values in initial for value in values]
            outcome = await gateway.response_hook("sync", HttpRequest(),
                                                  HttpResponse(200, upstream, b""))
    finally:
        await server.stop(1)
    assert outcome.response is not None
    got = [(k, v) for k, v in outcome.response.headers if k != "Content-Length"]
    assert got == [(key, value) for key, values in expected for value in values]


@pytest.mark.no_server
def test_canonical_header_keys() -> None:
    assert canonical_header_key("x-config-data") == "X-Config-Data"
    assert canonical_header_key("SET-COOKIE") == "Set-Cookie"
    assert canonical_header_key("bad key") == "bad key"


# -- 11.4 URL rewrite and method transform -----------------------------------------------------


def rewrite_to_newpath(call: PluginCall) -> None:
    if call.request.url == "/test2" and call.request.method == "POST":
        call.request.url = "tyk://test-api-2/newpath"
        call.request.method = "GET"


async def test_url_rewrite_and_method_transform() -> None:
    server = TykPluginServer(plugins=[Plugin("rewrite", rewrite_to_newpath, hook="post")],
                             **LOCAL)
    await server.start()
    try:
        async with Gateway(server) as gateway:
            rewritten = await gateway.request_hook("post", "rewrite", HttpRequest("POST", "/test2"))
            other = await gateway.request_hook("post", "rewrite", HttpRequest("POST", "/post"))
    finally:
        await server.stop(1)
    assert (rewritten.request.url, rewritten.request.method) == ("tyk://test-api-2/newpath",
                                                                 "GET")
    assert "newpath" not in other.request.url and other.request.method == "POST"


# -- 11.5 and section 4: what the gateway reads back from request hooks ------------------------


def post_process(call: PluginCall) -> None:
    call.request.set_header("Test", "value")
    call.request.delete_header("Deletethisheader")
    call.request.delete_param("remove")
    call.request.set_param("customparam", "customvalue")


async def run_pre(plugin: Any, request: HttpRequest, hook: Hook = Hook.PRE) -> Any:
    server = TykPluginServer(plugins=[Plugin("hook", plugin)], **LOCAL)
    await server.start()
    try:
        async with Gateway(f"tcp://127.0.0.1:{server.plaintext_port}") as gw:
            return await gw.request_hook(hook, "hook", request)
    finally:
        await server.stop(1)


async def test_headers_set_and_deleted_params_added_and_deleted() -> None:
    outcome = await run_pre(post_process, HttpRequest(
        "GET", "/api/x?a=1&b=2&remove=3", [("Deletethisheader", "x"), ("Keep", "y")]))
    request = outcome.returned.request
    assert dict(request.set_headers) == {"Test": "value"}
    assert list(request.delete_headers) == ["Deletethisheader"]
    assert dict(request.add_params) == {"customparam": "customvalue"}
    assert list(request.delete_params) == ["remove"]
    upstream = outcome.request
    assert upstream.header("Test") == "value" and upstream.header("Keep") == "y"
    assert upstream.header("Deletethisheader") is None
    assert sorted(upstream.query) == [("a", "1"), ("b", "2"), ("customparam", "customvalue")]


async def test_last_header_and_param_call_wins() -> None:
    def flip(call: PluginCall) -> None:
        call.request.set_header("X-A", "1")
        call.request.delete_header("x-a")
        call.request.delete_header("X-B")
        call.request.set_header("x-b", "2")
        call.request.delete_param("p")
        call.request.set_param("p", "new")

    outcome = await run_pre(flip, HttpRequest("GET", "/?p=old", [("X-A", "0"), ("X-B", "0")]))
    assert outcome.request.header("X-A") is None
    assert outcome.request.header("X-B") == "2"
    assert outcome.request.query == [("p", "new")]


async def test_extended_params_and_url_query_are_not_how_the_query_changes() -> None:
    def wrong_ways(call: PluginCall) -> None:
        call.object.request.extended_params["ignored"] = "1"
        call.object.request.url = "/api/x?a=changed"

    outcome = await run_pre(wrong_ways, HttpRequest("GET", "/api/x?a=1"))
    assert outcome.request.query == [("a", "1")]


async def test_path_rewrite_keeps_the_query() -> None:
    def v2(call: PluginCall) -> None:
        call.request.url = call.request.url.replace("/v1/", "/v2/", 1)

    outcome = await run_pre(v2, HttpRequest("GET", "/api/v1/pets?limit=2"))
    assert outcome.request.url == "/api/v2/pets?limit=2"


# "/with space" is not here: Go accepts it (and escapes it to /with%20space).
@pytest.mark.no_server
@pytest.mark.parametrize("bad", ["", "relative/path", "/bad%zz", "http://[::1/x"])
def test_url_must_parse_as_a_request_uri(bad: str) -> None:
    from calloutkit.tyk.testing import request_object

    call = PluginCall(request_object("pre", "x", HttpRequest()))
    with pytest.raises(ValueError):
        call.request.url = bad


async def test_raw_body_is_the_body_the_upstream_gets() -> None:
    def replace_body(call: PluginCall) -> None:
        call.request.body = json.dumps({"wrapped": call.request.json()})

    outcome = await run_pre(replace_body, HttpRequest(
        "POST", "/x", [("Content-Type", "application/json"), ("Content-Length", "8")],
        b'{"a": 1}'))
    assert outcome.request.body == b'{"wrapped": {"a": 1}}'
    assert outcome.request.header("Content-Length") == str(len(outcome.request.body))
    assert outcome.returned.request.body == ""  # the gateway reads raw_body only


async def test_the_text_body_is_never_read_back() -> None:
    def only_text(call: PluginCall) -> None:
        call.object.request.body = "changed"

    outcome = await run_pre(only_text, HttpRequest("POST", "/x", [], b"original"))
    assert outcome.request.body == b"original"


@pytest.mark.parametrize("code", [-1, 0])
async def test_return_overrides_minus_one_or_zero_continue(code: int) -> None:
    def set_code(call: PluginCall) -> None:
        call.object.request.return_overrides.response_code = code

    outcome = await run_pre(set_code, HttpRequest("GET", "/x"))
    assert not outcome.stopped and outcome.events == []


async def test_a_200_answer_short_circuits_with_exactly_that_response() -> None:
    def answer(call: PluginCall) -> None:
        call.respond(200, "body", headers={"header": "value"})

    outcome = await run_pre(answer, HttpRequest("GET", "/x"))
    assert outcome.stopped and outcome.events == []
    assert outcome.response == HttpResponse(200, [("header", "value")], b"body")
    assert outcome.returned.request.return_overrides.override_error is False


async def test_an_error_override_renders_the_json_error_and_fires_auth_failure() -> None:
    def deny(call: PluginCall) -> None:
        call.reject(401, "custom error message")

    outcome = await run_pre(deny, HttpRequest("GET", "/x"))
    assert outcome.response is not None and outcome.response.status == 401
    assert outcome.response.body == b'{\n    "error": "custom error message"\n}'
    assert outcome.response.header("Content-Type") == "application/json"
    assert outcome.events == ["AuthFailure"]  # even from a Pre hook


async def test_override_error_sends_a_4xx_raw_without_the_event() -> None:
    def raw_403(call: PluginCall) -> None:
        call.respond(403, json={"blocked": True, "reason": "ip"})

    outcome = await run_pre(raw_403, HttpRequest("GET", "/x"))
    overrides = outcome.returned.request.return_overrides
    assert (overrides.response_code, overrides.override_error) == (403, True)
    assert outcome.response == HttpResponse(
        403, [("Content-Type", "application/json")], b'{"blocked": true, "reason": "ip"}')
    assert outcome.events == []


async def test_response_error_wins_and_an_empty_message_says_key_not_authorised() -> None:
    def both(call: PluginCall) -> None:
        overrides = call.object.request.return_overrides
        overrides.response_code = 400
        overrides.response_error = "from error"
        overrides.response_body = "from body"

    def empty(call: PluginCall) -> None:
        call.object.request.return_overrides.response_code = 403

    assert (await run_pre(both, HttpRequest())).response.json() == {"error": "from error"}
    assert (await run_pre(empty, HttpRequest())).response.json() == {
        "error": "Key not authorised"}


@pytest.mark.no_server
def test_reject_and_respond_validate_their_input() -> None:
    from calloutkit.tyk.testing import request_object

    call = PluginCall(request_object("pre", "x", HttpRequest()))
    with pytest.raises(ValueError, match="400-599"):
        call.reject(200)
    with pytest.raises(ValueError, match="UTF-8"):
        call.respond(200, b"\xff")
    with pytest.raises(ValueError, match="body or json"):
        call.respond(200, "x", json={})
    with pytest.raises(ValueError, match="invalid header name"):
        call.request.set_header("bad name", "x")
    with pytest.raises(ValueError, match="invalid value"):
        call.request.set_header("X-Ok", "a\r\nInjected: 1")
    call.reject(403)
    assert call.object.request.return_overrides.response_error == "Forbidden"
    assert call.short_circuits


# -- section 5: custom key check ---------------------------------------------------------------


async def test_auth_needs_session_and_token() -> None:
    def session_only(call: PluginCall) -> None:
        call.object.session.rate = 5

    def token_only(call: PluginCall) -> None:
        call.metadata["token"] = "abc"

    for plugin in (session_only, token_only):
        outcome = await run_pre(plugin, HttpRequest(), hook=Hook.CUSTOM_KEY_CHECK)
        assert outcome.response is not None and outcome.response.status == 403, plugin
        assert outcome.events == ["AuthFailure"]


async def test_authorize_sets_the_session_and_token_and_undoes_a_reject() -> None:
    def accept(call: PluginCall) -> None:
        call.reject(401, "not yet")
        call.authorize("key-1", rate=100, per=1, quota_max=1000, quota_renewal_rate=3600,
                       expires=2_000_000_000, metadata={"plan": "gold"},
                       apply_policies=["p1"])

    outcome = await run_pre(accept, HttpRequest(), hook=Hook.CUSTOM_KEY_CHECK)
    assert not outcome.stopped and outcome.key == "key-1"
    returned = outcome.returned
    assert returned.metadata["token"] == "key-1"
    assert returned.request.return_overrides.response_code == -1
    session = returned.session
    assert (session.rate, session.per, session.quota_max, session.quota_renewal_rate,
            session.expires) == (100, 1, 1000, 3600, 2_000_000_000)
    assert dict(session.metadata) == {"plan": "gold"} and list(session.apply_policies) == ["p1"]
    assert outcome.session.metadata["token"] == "key-1"


@pytest.mark.no_server
def test_authorize_rejects_unknown_fields_and_empty_tokens() -> None:
    from calloutkit.tyk.testing import request_object

    call = PluginCall(request_object("auth_check", "x", HttpRequest()))
    with pytest.raises(ValueError, match="quota"):
        call.authorize("k", quota=5)
    with pytest.raises(ValueError, match="non-empty token"):
        call.authorize("")
    base = SessionState(rate=7, tags=["a"])
    session = call.authorize("k", base, tags=["b"])
    assert (session.rate, list(session.tags)) == (7, ["b"])


async def test_the_gateway_keeps_quota_counters_of_an_existing_session() -> None:
    def accept(call: PluginCall) -> None:
        call.authorize("k", quota_max=10, quota_remaining=10, quota_renews=1)

    server = TykPluginServer(plugins=[Plugin("auth", accept)], **LOCAL)
    await server.start()
    try:
        async with Gateway(server) as gateway:
            gateway.sessions["k"] = SessionState(quota_remaining=3, quota_renews=99)
            outcome = await gateway.request_hook("auth_check", "auth", HttpRequest())
    finally:
        await server.stop(1)
    assert (outcome.session.quota_remaining, outcome.session.quota_renews) == (3, 99)


# -- section 6: Response hooks with the helpers ------------------------------------------------


async def run_response(plugin: Any, response: HttpResponse) -> Any:
    server = TykPluginServer(plugins=[Plugin("hook", plugin)], **LOCAL)
    await server.start()
    try:
        async with Gateway(server) as gateway:
            return await gateway.response_hook("hook", HttpRequest(), response)
    finally:
        await server.stop(1)


COOKIES = HttpResponse(200, [("Content-Type", "text/html"), ("Set-Cookie", "a=1"),
                             ("Set-Cookie", "b=2"), ("Content-Length", "4")], b"body")


async def test_response_helpers_add_a_cookie_keeping_the_others() -> None:
    def add_cookie(call: PluginCall) -> None:
        call.response.add_header("set-cookie", "c=3")
        assert call.response.headers.get_all("Set-Cookie") == ["a=1", "b=2", "c=3"]

    outcome = await run_response(add_cookie, COOKIES)
    assert outcome.response.header_values("Set-Cookie") == ["a=1", "b=2", "c=3"]
    returned = outcome.returned.response
    assert returned.headers["Set-Cookie"] == "a=1"  # the map keeps the first value


async def test_response_helpers_set_delete_status_and_body() -> None:
    def rewrite(call: PluginCall) -> None:
        call.response.set_header("Set-Cookie", "only=1")
        call.response.delete_header("content-type")
        call.response.set_header("Content-Type", "application/json")
        call.response.status = 201
        call.response.body = json.dumps({"was": call.response.text})

    outcome = await run_response(rewrite, COOKIES)
    response = outcome.response
    assert response.status == 201
    assert response.body == b'{"was": "body"}'
    assert response.header_values("Set-Cookie") == ["only=1"]
    assert response.header_values("Content-Type") == ["application/json"]
    # Older gateways (before 5.8) do not fix Content-Length: the Object already carries it.
    returned = outcome.returned.response
    assert returned.headers["Content-Length"] == str(len(response.body))
    assert returned.body == ""  # the gateway reads raw_body only
    # Gateways before 5.2 read only the map; it agrees with the multi-value list.
    assert dict(returned.headers) == {h.key: h.values[0] for h in returned.multivalue_headers}


async def test_reject_in_a_response_hook_replaces_the_response() -> None:
    def deny(call: PluginCall) -> None:
        call.reject(502, "upstream said no")

    outcome = await run_response(deny, COOKIES)
    assert outcome.response.status == 502
    assert outcome.response.json() == {"error": "upstream said no"}
    assert outcome.response.header_values("Set-Cookie") == []


# -- section 7: gRPC errors -------------------------------------------------------------------


@pytest.mark.parametrize(("hook", "status", "message"), [
    (Hook.PRE, 500, "Middleware error"), (Hook.POST, 500, "Middleware error"),
    (Hook.POST_KEY_AUTH, 500, "Middleware error"),
    (Hook.CUSTOM_KEY_CHECK, 403, "Key not authorised")])
async def test_a_grpc_error_is_what_the_gateway_turns_into(hook: Hook, status: int,
                                                           message: str) -> None:
    def boom(call: PluginCall) -> None:
        raise RuntimeError("x")

    server = TykPluginServer(plugins=[Plugin("hook", boom)], error_policy="abort", **LOCAL)
    await server.start()
    try:
        async with Gateway(f"tcp://127.0.0.1:{server.plaintext_port}") as gateway:
            outcome = await gateway.request_hook(hook, "hook", HttpRequest())
            response_outcome = await gateway.response_hook("hook", HttpRequest(), COOKIES)
    finally:
        await server.stop(1)
    assert outcome.error is not None and outcome.error.startswith("INTERNAL")
    assert (outcome.response.status, outcome.response.json()) == (status, {"error": message})
    assert response_outcome.response.status == 500


# -- the model follows Go where Python would differ ------------------------------------------


@pytest.mark.parametrize(("url", "upstream"), [
    ("/a b", "/a%20b"), ("/a#b", "/a%23b"), ("/p?q=a b", "/p?q=a b"), ("/%41", "/%41"),
])
async def test_a_url_go_accepts_goes_upstream_escaped_as_go_escapes_it(url: str,
                                                                       upstream: str) -> None:
    def rewrite(call: PluginCall) -> None:
        call.object.request.url = url

    query = "?" + url.partition("?")[2] if "?" in url else ""
    outcome = await run_pre(rewrite, HttpRequest("GET", "/orig" + query))
    assert outcome.response is None, outcome.error
    assert outcome.request.url == upstream


class ReturnsUrl(TykPluginServer):
    """A plugin server that answers with another url, past calloutkit's own url check."""

    def __init__(self, url: str) -> None:
        super().__init__(**LOCAL)
        self.url = url

    async def dispatch_bytes(self, data: bytes) -> bytes:
        obj = Object.FromString(data)
        obj.request.url = self.url
        return bytes(obj.SerializeToString())


@pytest.mark.no_server
@pytest.mark.parametrize("url", ["/a%zz", "http://[::1/x", "relative", "/a\x7f", ""])
async def test_a_url_go_refuses_is_a_middleware_error(url: str) -> None:
    async with Gateway(ReturnsUrl(url)) as gateway:
        outcome = await gateway.request_hook(Hook.PRE, "any", HttpRequest("GET", "/x"))
    assert outcome.response is not None and outcome.response.status == 500
    assert outcome.response.json() == {"error": "Middleware error"}


async def test_the_query_is_rebuilt_as_url_values_encode_does() -> None:
    def add(call: PluginCall) -> None:
        call.request.set_param("c", "3 4")

    outcome = await run_pre(add, HttpRequest("GET", "/p?b=2&a=1&a=0&x;y=1"))
    # Keys sorted, each key's values in their order, the `;` pair dropped (Go 1.17+).
    assert outcome.request.url == "/p?a=1&a=0&b=2&c=3+4"


async def test_an_unchanged_query_is_kept_as_it_came() -> None:
    outcome = await run_pre(lambda call: None, HttpRequest("GET", "/p?b=2&a=1&x;y=1"))
    assert outcome.request.url == "/p?b=2&a=1&x;y=1"


@pytest.mark.parametrize("content_type", ["application/xml", "text/xml; charset=utf-8",
                                          "application/soap+xml"])
async def test_errors_use_the_xml_template_for_an_xml_request(content_type: str) -> None:
    outcome = await run_pre(lambda call: call.reject(401, "no <key>"),
                            HttpRequest("POST", "/x", [("Content-Type", content_type)], b"<a/>"))
    response = outcome.response
    assert response is not None and response.status == 401
    assert response.body == (b'<?xml version = "1.0" encoding = "UTF-8"?>\n'
                             b"<error>no <key></error>\n")
    assert response.header_values("Content-Type") == [content_type.split(";")[0]]


async def test_the_error_content_type_replaces_the_plugins() -> None:
    def reject(call: PluginCall) -> None:
        call.reject(403, "no", headers={"Content-Type": "text/plain", "X-Why": "because"})

    outcome = await run_pre(reject, HttpRequest())
    assert outcome.response is not None
    assert outcome.response.header_values("Content-Type") == ["application/json"]
    assert outcome.response.header("X-Why") == "because"


async def test_empty_config_data_is_not_sent(plugins: TykPluginServer) -> None:
    async with Gateway(target(plugins), api_id="8", config_data={}) as gateway:
        outcome = await gateway.response_hook("testConfigDataResponseHook", HttpRequest(),
                                              HttpResponse(200, [], b"x"))
    assert "config_data" not in outcome.returned.spec
    assert outcome.response is not None and outcome.response.header("X-Config-Data") == "false"


def grow(call: PluginCall) -> None:
    call.request.body = b"y" * (5 * 1024 * 1024)


@pytest.mark.parametrize("in_process", [True, False])
async def test_a_reply_over_the_gateways_receive_limit_is_a_middleware_error(
        in_process: bool) -> None:
    server = TykPluginServer(plugins=[Plugin("grow", grow)], **LOCAL)
    async with running(server):
        where: Any = server if in_process else target(server)
        async with Gateway(where) as gateway:  # 4 MiB, the gateway's default
            refused = await gateway.request_hook(Hook.PRE, "grow", HttpRequest())
        async with Gateway(where, grpc_recv_max_size=8 * 1024 * 1024) as gateway:
            allowed = await gateway.request_hook(Hook.PRE, "grow", HttpRequest())
    assert refused.response is not None and refused.response.status == 500
    assert refused.error is not None and "RESOURCE_EXHAUSTED" in refused.error
    assert allowed.response is None and len(allowed.request.body) == 5 * 1024 * 1024


# -- statuses Go's WriteHeader can write ------------------------------------------------------


@pytest.mark.no_server
@pytest.mark.parametrize("status", [0, 42, 99, 100, 101, 199, 1000])
def test_helpers_refuse_statuses_go_cannot_answer_with(status: int) -> None:
    from calloutkit.tyk.testing import request_object, response_object

    call = PluginCall(request_object("pre", "x", HttpRequest()))
    with pytest.raises(ValueError, match="expected 200-999"):
        call.respond(status, "x")
    response_call = PluginCall(response_object("x", HttpRequest(), HttpResponse()))
    with pytest.raises(ValueError, match="expected 200-999"):
        response_call.response.status = status


@pytest.mark.parametrize("status", [200, 599, 799, 999])
async def test_statuses_tyk_passes_are_accepted(status: int) -> None:
    outcome = await run_pre(lambda call: call.respond(status, "x"), HttpRequest())
    assert outcome.response is not None and outcome.response.status == status

    def set_status(call: PluginCall) -> None:
        call.response.status = status

    server = TykPluginServer(plugins=[Plugin("r", set_status)], **LOCAL)
    async with Gateway(server) as gateway:
        res = await gateway.response_hook("r", HttpRequest(), HttpResponse(200, [], b"x"))
    assert res.response is not None and res.response.status == status


@pytest.mark.parametrize("code", [42, 150])
async def test_a_raw_response_code_go_cannot_write_meets_the_error_policy(code: int) -> None:
    def raw(call: PluginCall) -> None:
        call.object.request.return_overrides.response_code = code

    outcome = await run_pre(raw, HttpRequest())
    assert outcome.response is not None and outcome.response.status == 500
    assert outcome.response.json() == {"error": "internal error in plugin"}
