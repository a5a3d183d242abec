"""AuthzServer in process (AuthzClient, no sockets): the request view, the answers, the
error policy, and bad returns."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest
from conftest import LOOPBACK
from envoy.service.auth.v3 import external_auth_pb2 as apb
from google.protobuf import json_format

from calloutkit import (
    AuthzRequest,
    AuthzServer,
    CalloutError,
    ConfigError,
    ErrorPolicy,
    allow_request,
    deny_request,
)
from calloutkit.testing import AuthzClient, StreamEnded, check_request

# No test here starts a server: each runs once, not per transport.
pytestmark = pytest.mark.no_server


class Recorder(AuthzServer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**LOOPBACK, **kwargs)
        self.seen: list[tuple[AuthzRequest, Any]] = []

    def on_check(self, request, context):
        self.seen.append((request, context))


async def test_the_view_reads_every_attribute() -> None:
    server = Recorder()
    reply = await AuthzClient(server, metadata=[("x-tenant", "t1")]).check(
        "POST", "/orders?id=7", host="shop.example", scheme="https",
        headers={"X-Api-Key": "k1", "Content-Type": "text/plain"}, body=b"hello",
        source=("10.1.2.3", 4321), destination=("192.0.2.1", 8443),
        principal="spiffe://shop/client", peer_certificate="-----BEGIN%20CERT",
        context_extensions={"route": "orders"}, metadata={"policy": {"tier": "gold", "n": 2}})
    assert reply.status.code == 0 and reply.HasField("ok_response")
    [(request, context)] = server.seen
    assert (request.method, request.path, request.host, request.scheme) == (
        "POST", "/orders?id=7", "shop.example", "https")
    assert request.headers["x-api-key"] == "k1" == request.headers["X-API-KEY"]
    assert "CONTENT-TYPE" in request.headers and request.headers.get("nope") is None
    assert request.headers[":method"] == "POST"
    assert request.body == b"hello"
    assert (request.source_address, request.source_port) == ("10.1.2.3", 4321)
    assert (request.destination_address, request.destination_port) == ("192.0.2.1", 8443)
    assert request.principal == "spiffe://shop/client"
    assert request.peer_certificate == "-----BEGIN%20CERT"
    assert request.context_extensions == {"route": "orders"}
    assert request.metadata == {"policy": {"tier": "gold", "n": 2}}
    assert request.raw.attributes.request.http.method == "POST"
    assert request.attributes is request.raw.attributes or (
        request.attributes == request.raw.attributes)
    assert context.invocation_metadata() == (("x-tenant", "t1"),)


def test_the_view_reads_raw_header_maps_too() -> None:
    # With the filter's encode_raw_headers: true, Envoy sends header_map with raw_value.
    raw = apb.CheckRequest()
    headers = raw.attributes.request.http.header_map.headers
    headers.add(key="x-multi", raw_value=b"a")
    headers.add(key="x-multi", raw_value=b"b")
    headers.add(key="X-Upper", raw_value=b"\xc3\xa9")
    view = AuthzRequest(raw)
    assert dict(view.headers) == {"x-multi": "a,b", "x-upper": "é"}


async def test_none_allows_and_helpers_build_what_they_say() -> None:
    class Server(AuthzServer):
        async def on_check(self, request, context):
            if request.path == "/deny":
                return deny_request(401, "who are you?\n", [("WWW-Authenticate", "Bearer")],
                                    dynamic_metadata={"reason": "no token"})
            if request.path == "/allow":
                return allow_request(
                    [("x-added", "1")], headers_to_set={"x-set": b"2"},
                    headers_to_append=[("x-appended", "3")], headers_to_remove=["X-Gone"],
                    response_headers_to_add=[("x-resp", "4")],
                    query_parameters_to_set=[("Page", "2")], query_parameters_to_remove="debug",
                    dynamic_metadata={"user": "ada", "roles": ["a", "b"]})
            return None

    client = AuthzClient(Server(**LOOPBACK))
    assert (await client.check(check_request(path="/other"))) == allow_request()
    denied = await client.check(path="/deny")
    assert denied.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert denied.denied_response.status.code == 401
    assert denied.denied_response.body == "who are you?\n"
    assert [(h.header.key, h.header.value) for h in denied.denied_response.headers] == [
        ("www-authenticate", "Bearer")]
    assert json_format.MessageToDict(denied.dynamic_metadata) == {"reason": "no token"}
    ok = (await client.check(path="/allow")).ok_response
    assert [(h.header.key, h.header.value, h.HasField("append"), h.append.value)
            for h in ok.headers] == [("x-added", "1", False, False),
                                     ("x-set", "2", True, False),
                                     ("x-appended", "3", True, True)]
    assert all(not h.header.raw_value for h in ok.headers)  # ext_authz reads `value`
    assert list(ok.headers_to_remove) == ["x-gone"]
    assert [(h.header.key, h.header.value) for h in ok.response_headers_to_add] == [
        ("x-resp", "4")]
    assert [(q.key, q.value) for q in ok.query_parameters_to_set] == [("Page", "2")]
    assert list(ok.query_parameters_to_remove) == ["debug"]


def test_helpers_refuse_what_envoy_cannot_carry() -> None:
    with pytest.raises(CalloutError, match="not an HTTP status"):
        deny_request(42)
    with pytest.raises(CalloutError, match="not UTF-8"):
        allow_request([("x-bin", b"\xff")])
    with pytest.raises(CalloutError, match="pairs"):
        allow_request(["x-bad"])  # type: ignore[list-item]
    with pytest.raises(CalloutError, match="not str or bytes"):
        deny_request(403, body=12)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="error_status"):
        AuthzServer(**LOOPBACK, error_status=42)
    with pytest.raises(ConfigError, match="error_policy"):
        AuthzServer(**LOOPBACK, error_policy="maybe")


class Boom(AuthzServer):
    def on_check(self, request, context):
        if request.path == "/wrong-type":
            return {"allow": True}
        raise RuntimeError("secret database password in the message")


@pytest.mark.parametrize("status", [403, 500])
async def test_a_raising_callback_is_denied_without_its_text(status, caplog) -> None:
    caplog.set_level(logging.ERROR)
    client = AuthzClient(Boom(**LOOPBACK, error_status=status))
    for path in ("/raise", "/wrong-type"):
        reply = await client.check(path=path)
        assert reply.denied_response.status.code == status
        assert reply.denied_response.body == "authorization check failed\n"
        assert b"secret" not in reply.SerializeToString()
        assert b"dict" not in reply.SerializeToString()
    assert "secret database password" in caplog.text  # logged for the operator


async def test_the_continue_policy_allows_and_abort_ends_the_call() -> None:
    allowed = await AuthzClient(Boom(**LOOPBACK, error_policy="continue")).check()
    assert allowed == allow_request()
    with pytest.raises(StreamEnded) as ended:
        await AuthzClient(Boom(**LOOPBACK, error_policy=ErrorPolicy.ABORT)).check()
    assert ended.value.code == grpc.StatusCode.INTERNAL
    assert "secret" not in ended.value.details


async def test_context_abort_ends_the_call_with_its_status() -> None:
    class Server(AuthzServer):
        def on_check(self, request, context):
            context.abort(grpc.StatusCode.UNAVAILABLE, "policy store down")

    with pytest.raises(StreamEnded) as ended:
        await AuthzClient(Server(**LOOPBACK)).check()
    assert (ended.value.code, ended.value.details) == (grpc.StatusCode.UNAVAILABLE,
                                                       "policy store down")


async def test_sync_callbacks_run_in_the_pool_and_async_ones_concurrently() -> None:
    class Slow(AuthzServer):
        async def on_check(self, request, context):
            await asyncio.sleep(0.2)
            return allow_request(headers_to_set=[("x-path", request.path)])

    client = AuthzClient(Slow(**LOOPBACK))
    started = asyncio.get_running_loop().time()
    replies = await asyncio.gather(*(client.check(path=f"/{n}") for n in range(50)))
    assert asyncio.get_running_loop().time() - started < 2
    assert [r.ok_response.headers[0].header.value for r in replies] == [
        f"/{n}" for n in range(50)]


async def test_a_malformed_message_is_invalid_argument() -> None:
    server = AuthzServer(**LOOPBACK)
    with pytest.raises(Exception) as raised:
        await server.check_bytes(b"\xff\xff\xff")
    assert getattr(raised.value, "code", None) == grpc.StatusCode.INVALID_ARGUMENT
