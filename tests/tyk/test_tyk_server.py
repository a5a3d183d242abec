"""TykPluginServer over real gRPC on loopback: the echo rule, registration, errors, concurrency."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Certs, running
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from calloutkit import ConfigError
from calloutkit.tyk import (
    EventHandler,
    GatewayEvent,
    Hook,
    Object,
    Plugin,
    PluginCall,
    SessionState,
    TykPluginServer,
)
from calloutkit.tyk._proto import without_text_bodies
from calloutkit.tyk.testing import (
    HttpRequest,
    HttpResponse,
    event_payload,
    request_object,
    response_object,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PETSTORE = EXAMPLES / "tyk_logging" / "petstore_response.json"
LOCAL = {"plaintext_address": ("127.0.0.1", 0), "combined_health_check": True}
DISPATCH = "/coprocess.Dispatcher/Dispatch"
EVENT = "/coprocess.Dispatcher/DispatchEvent"


def petstore() -> Object:
    return json_format.Parse(PETSTORE.read_text(), Object())


def textless(data: bytes) -> Object:
    """What the server answers for an unchanged Object: the text body copies left out."""
    obj = Object.FromString(data)
    for part in ("request", "response"):
        if obj.HasField(part):
            getattr(obj, part).ClearField("body")
    return obj


def echo(data: bytes) -> bytes:
    """The bytes received minus the text bodies, everything else byte for byte."""
    return without_text_bodies(data)


def pre_object(name: str = "p", hook: Hook = Hook.PRE, **request: Any) -> Object:
    return request_object(hook, name, HttpRequest(**request), api_id="api-1", org_id="org")


class Channel:
    """Raw-bytes client: what goes out is exactly what the test built."""

    def __init__(self, server: TykPluginServer) -> None:
        self.port = server.plaintext_port
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.raw = self.channel.unary_unary(DISPATCH)
        self.raw_event = self.channel.unary_unary(EVENT)

    async def dispatch(self, obj: Object | bytes) -> Object:
        data = obj if isinstance(obj, bytes) else obj.SerializeToString()
        return Object.FromString(await self.raw(data, timeout=30))


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    started: list[TykPluginServer] = []
    channels: list[Channel] = []

    async def start(server: TykPluginServer) -> Channel:
        await server.start()
        started.append(server)
        channels.append(Channel(server))
        return channels[-1]

    yield start
    for channel in channels:
        await channel.channel.close()
    for server in started:
        await server.stop(1)


# -- the echo rule -----------------------------------------------------------------------------


def observe(call: PluginCall) -> None:
    assert call.hook in (Hook.RESPONSE, Hook.PRE)  # reads, changes nothing


async def test_petstore_payload_round_trips_byte_identical(serve: Any) -> None:
    client = await serve(TykPluginServer(plugins=[Plugin("MyResponsePlugin", observe)], **LOCAL))
    sent = petstore().SerializeToString()
    reply = await client.raw(sent)
    assert reply == echo(sent) and Object.FromString(reply) == textless(sent)
    assert len(reply) < len(sent)  # the petstore payload has text bodies


async def test_unknown_fields_and_gateway_map_order_come_back_byte_identical(serve: Any) -> None:
    client = await serve(TykPluginServer(plugins=[Plugin("MyResponsePlugin", observe)], **LOCAL))
    base = petstore()
    # Concatenated messages merge: this puts spec entries in an order of our choosing (as a Go
    # gateway's random map order would), then a session field 35 and an Object field 20 that
    # this version does not know.
    extra_session = b"\x9a\x02\x04v6.0"
    sent = (base.SerializeToString()
            + Object(spec={"zz": "1"}).SerializeToString()
            + Object(spec={"OrgID": "5e9d9544a1dcd60001d0ed20"}).SerializeToString()
            + b"\x22" + bytes([len(extra_session)]) + extra_session
            + b"\xa0\x01\x2a")
    assert Object.FromString(sent).SerializeToString() != sent  # reserialising would not do
    reply = await client.raw(sent)
    assert reply == echo(sent) and Object.FromString(reply) == textless(sent)
    assert reply.endswith(b"\xa0\x01\x2a") and extra_session in reply


async def test_unknown_group_fields_come_back_and_the_text_bodies_still_go(serve: Any) -> None:
    client = await serve(TykPluginServer(plugins=[Plugin("MyResponsePlugin", observe)], **LOCAL))
    # Groups (wire types 3 and 4), nested, which protobuf keeps as unknown fields: one in the
    # Object (field 30) and one in its request (field 40, merged into request by field 3).
    group = b"\xf3\x01" + b"\x08\x05" + b"\x13\x08\x07\x14" + b"\xf4\x01"
    request_group = b"\xc3\x02\x08\x01\xc4\x02"
    sent = (petstore().SerializeToString() + group
            + b"\x1a" + bytes([len(request_group)]) + request_group)
    reply = await client.raw(sent)
    assert Object.FromString(reply) == textless(sent)
    assert reply.endswith(b"\x1a" + bytes([len(request_group)]) + request_group)
    assert group in reply and len(reply) < len(sent)


def tag(call: PluginCall) -> None:
    call.request.set_header("X-Tagged", "yes")


async def test_a_changed_object_is_the_received_one_plus_the_change(serve: Any) -> None:
    client = await serve(TykPluginServer(plugins=[Plugin("MyResponsePlugin", tag)], **LOCAL))
    sent = petstore().SerializeToString() + b"\xa0\x01\x2a"
    returned = await client.dispatch(sent)
    expected = textless(sent)
    expected.request.set_headers["X-Tagged"] = "yes"
    assert returned == expected
    assert returned.SerializeToString().endswith(b"\xa0\x01\x2a")  # unknown field kept


async def test_unregistered_hook_comes_back_unchanged_with_one_warning(
        serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    client = await serve(TykPluginServer(plugins=[Plugin("known", tag)], **LOCAL))
    sent = pre_object("unknown").SerializeToString()
    with caplog.at_level(logging.WARNING, "calloutkit.tyk"):
        assert await client.raw(sent) == sent
        assert await client.raw(sent) == sent
    warnings = [r.getMessage() for r in caplog.records if "no plugin registered" in r.getMessage()]
    assert warnings == ["Dispatch Pre 'unknown' (API api-1): no plugin registered for this "
                        "hook; returning the Object unchanged"]


async def test_hook_restriction_and_precedence(serve: Any) -> None:
    def by_name(call: PluginCall) -> None:
        call.request.set_header("X-Which", "name")

    def for_post(call: PluginCall) -> None:
        call.request.set_header("X-Which", "post")

    client = await serve(TykPluginServer(plugins=[
        Plugin("only-pre", tag, hook="pre"), Plugin("both", by_name),
        Plugin("both", for_post, hook=Hook.POST)], **LOCAL))
    assert (await client.dispatch(pre_object("only-pre"))).request.set_headers["X-Tagged"] == "yes"
    unchanged = pre_object("only-pre", Hook.POST)
    assert await client.dispatch(unchanged) == unchanged
    assert dict((await client.dispatch(pre_object("both"))).request.set_headers) == {
        "X-Which": "name"}
    assert dict((await client.dispatch(pre_object("both", Hook.POST))).request.set_headers) == {
        "X-Which": "post"}


class Stateful(TykPluginServer):
    """Plugins written as methods in the class body get ``self``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen: list[str] = []

    def count(self, call: PluginCall) -> None:
        self.seen.append(call.name)
        call.request.set_header("X-Count", str(len(self.seen)))

    async def count_async(self, call: PluginCall) -> None:
        await asyncio.sleep(0)
        self.count(call)

    plugins = [Plugin("sync", count), Plugin("async", count_async)]


async def test_sync_and_async_methods_share_one_shape(serve: Any) -> None:
    server = Stateful(**LOCAL)
    client = await serve(server)
    assert (await client.dispatch(pre_object("sync"))).request.set_headers["X-Count"] == "1"
    assert (await client.dispatch(pre_object("async"))).request.set_headers["X-Count"] == "2"
    assert server.seen == ["sync", "async"]


# -- platform: reflection, health, TLS ---------------------------------------------------------


async def test_reflection_lists_the_dispatcher_and_health_is_serving(serve: Any) -> None:
    client = await serve(TykPluginServer(**LOCAL))
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    answers = [a async for a in stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="coprocess.Dispatcher")]))]
    services = {s.name for s in answers[0].list_services_response.service}
    assert "coprocess.Dispatcher" in services
    from google.protobuf import descriptor_pb2

    files = [descriptor_pb2.FileDescriptorProto.FromString(raw).name
             for raw in answers[1].file_descriptor_response.file_descriptor_proto]
    assert files[0] == "coprocess_object.proto"
    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "coprocess.Dispatcher"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.no_server
def test_plaintext_by_default_without_a_tls_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        server = TykPluginServer(plaintext_port=0, combined_health_check=True)
    assert server.config.secure_address is None
    assert server.config.plaintext_address == ("0.0.0.0", 0)
    assert server.config.reflection is True
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.no_server
def test_tls_only_when_a_certificate_is_given(certs: Certs) -> None:
    server = TykPluginServer(plaintext_port=0, port=0, combined_health_check=True,
                             cert_chain_path=certs.cert_path, private_key_path=certs.key_path)
    assert server.config.secure_address is not None
    from_env = TykPluginServer(plaintext_port=0, port=0, combined_health_check=True, environ={
        "CALLOUTKIT_CERT_CHAIN_PATH": certs.cert_path,
        "CALLOUTKIT_PRIVATE_KEY_PATH": certs.key_path})
    assert from_env.config.secure_address is not None


@pytest.mark.no_server
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"plugins": [Plugin("a", tag), Plugin("a", observe)]}, "'a' is registered twice"),
    ({"plugins": [Plugin("a", tag, hook="pre"), Plugin("a", tag, hook=1)]},
     "'a' for PRE is registered twice"),
    ({"plugins": [tag]}, "expected Plugin(...)"),
    ({"events": [observe]}, "expected EventHandler(...)"),
    ({"error_policy": "ignore"}, "error_policy: 'ignore' is not one of"),
])
def test_configuration_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TykPluginServer(**LOCAL, **kwargs)


@pytest.mark.no_server
def test_plugin_validation() -> None:
    with pytest.raises(ConfigError, match="unknown hook 'prequel'"):
        Plugin("a", tag, hook="prequel")
    with pytest.raises(ConfigError, match="is not callable"):
        Plugin("a", "tag")  # type: ignore[arg-type]
    assert Plugin("a", tag, hook="auth_check").hook is Hook.CUSTOM_KEY_CHECK


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big")
            + payload)


def _h2_unary(port: int, path: str, message: bytes, authority: str) -> tuple[bytes, bool]:
    """One gRPC call over a hand-written HTTP/2 connection, so :authority can be empty (grpc
    clients always fill it). Returns the response message and whether the stream ended."""
    headers = [(":method", "POST"), (":scheme", "http"), (":path", path),
               (":authority", authority), ("content-type", "application/grpc"), ("te", "trailers")]
    # HPACK "literal header field without indexing, new name", no Huffman coding.
    block = b"".join(b"\x00" + bytes([len(k)]) + k.encode() + bytes([len(v)]) + v.encode()
                     for k, v in headers)
    body = b"\x00" + len(message).to_bytes(4, "big") + message
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(4, 0, 0)
                     + _h2_frame(1, 0x4, 1, block) + _h2_frame(0, 0x1, 1, body))
        buffer = b""
        while True:
            while len(buffer) < 9 or len(buffer) < 9 + int.from_bytes(buffer[:3], "big"):
                chunk = sock.recv(65536)
                if not chunk:
                    return data[5:], False
                buffer += chunk
            length, kind, flags = int.from_bytes(buffer[:3], "big"), buffer[3], buffer[4]
            stream = int.from_bytes(buffer[5:9], "big")
            payload, buffer = buffer[9:9 + length], buffer[9 + length:]
            if kind == 4 and not flags & 1:  # SETTINGS: acknowledge
                sock.sendall(_h2_frame(4, 1, 0))
            elif stream == 1 and kind == 0:
                data += payload
            elif stream == 1 and kind == 3:  # RST_STREAM
                return data[5:], False
            elif stream == 1 and kind == 1 and flags & 1:  # trailers end the stream
                return data[5:], True


@pytest.mark.parametrize("transport", ["grpcio", "native"])
@pytest.mark.parametrize("authority", ["", "localhost"])
async def test_an_empty_authority_as_older_gateways_send_is_served(serve: Any, authority: str,
                                                                   transport: str) -> None:
    client = await serve(TykPluginServer(plugins=[Plugin("ok", tag)], **LOCAL,
                                         transport=transport))
    message = pre_object("ok").SerializeToString()
    answer, ended = await asyncio.to_thread(_h2_unary, client.port, DISPATCH, message, authority)
    assert ended
    assert Object.FromString(answer).request.set_headers["X-Tagged"] == "yes"


# -- bad input and failing plugins -------------------------------------------------------------


def raises(call: PluginCall) -> None:
    call.request.set_header("X-Half", "done")
    raise RuntimeError("secret detail")


def returns_dict(call: PluginCall) -> Any:
    return {"set_headers": {"a": "b"}}


def returns_fresh(call: PluginCall) -> Any:
    return Object()


def clears_request(call: PluginCall) -> None:
    call.object.ClearField("request")


def empties_url(call: PluginCall) -> None:
    call.object.request.url = ""


def failing_server(**kwargs: Any) -> TykPluginServer:
    return TykPluginServer(plugins=[
        Plugin("raises", raises), Plugin("dict", returns_dict), Plugin("fresh", returns_fresh),
        Plugin("clears", clears_request), Plugin("url", empties_url),
        Plugin("MyResponsePlugin", raises), Plugin("ok", tag)], **LOCAL, **kwargs)


def assert_fail_closed(returned: Object, sent: Object) -> None:
    overrides = returned.request.return_overrides
    assert (overrides.response_code, overrides.override_error) == (500, True)
    assert json.loads(overrides.response_body) == {"error": "internal error in plugin"}
    assert dict(overrides.headers) == {"Content-Type": "application/json"}
    returned.request.ClearField("return_overrides")
    sent.request.ClearField("return_overrides")
    assert returned == sent  # nothing else changed; the plugin's half-done edit is gone


@pytest.mark.parametrize(("name", "log"), [
    ("raises", "plugin raises failed"),
    ("dict", "the plugin returned dict"),
    ("fresh", "the plugin returned a different Object"),
    ("clears", "the plugin removed a field the gateway reads: the Object has no request"),
    ("url", "url must not be empty"),
])
async def test_a_failing_plugin_answers_500_and_logs_why(
        serve: Any, caplog: pytest.LogCaptureFixture, name: str, log: str) -> None:
    client = await serve(failing_server())
    sent = pre_object(name)
    with caplog.at_level(logging.ERROR, "calloutkit.tyk"):
        returned = await client.dispatch(sent)
    assert_fail_closed(returned, sent)
    text = caplog.text
    assert f"Dispatch Pre '{name}' (API api-1): plugin" in text
    assert log in text
    assert "secret detail" not in returned.SerializeToString().decode("utf-8", "replace")


async def test_a_failing_response_hook_replaces_the_response(serve: Any) -> None:
    client = await serve(failing_server())
    returned = await client.dispatch(petstore())
    response = returned.response
    body = b'{"error": "internal error in plugin"}'
    assert (response.status_code, response.raw_body) == (500, body)
    assert dict(response.headers) == {"Content-Type": "application/json",
                                      "Content-Length": str(len(body))}
    assert [(h.key, list(h.values)) for h in response.multivalue_headers] == [
        ("Content-Type", ["application/json"]), ("Content-Length", [str(len(body))])]


@pytest.mark.parametrize(("mutate", "log"), [
    (lambda o: o.ClearField("request"), "the Object has no request"),
    (lambda o: o.request.ClearField("return_overrides"),
     "the Object's request has no return_overrides"),
])
async def test_malformed_objects_get_the_failure_response(
        serve: Any, caplog: pytest.LogCaptureFixture, mutate: Any, log: str) -> None:
    client = await serve(failing_server())
    sent = pre_object("ok")
    mutate(sent)
    with caplog.at_level(logging.ERROR, "calloutkit.tyk"):
        returned = await client.dispatch(sent)
    assert f"Dispatch Pre 'ok' (API api-1): {log}; answering with the fail_closed policy" \
        in caplog.text
    assert returned.request.return_overrides.response_code == 500
    assert "X-Tagged" not in returned.request.set_headers  # the plugin never ran


async def test_a_response_hook_without_a_response_is_malformed(
        serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    client = await serve(failing_server())
    sent = petstore()
    sent.ClearField("response")
    with caplog.at_level(logging.ERROR, "calloutkit.tyk"):
        returned = await client.dispatch(sent)
    assert "a Response hook Object without a response" in caplog.text
    assert returned.response.status_code == 500


async def test_bytes_that_are_not_an_object_get_invalid_argument(
        serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    client = await serve(failing_server())
    with caplog.at_level(logging.ERROR, "calloutkit.tyk"), \
            pytest.raises(grpc.aio.AioRpcError) as err:
        await client.raw(b"\xff\xff\xff")
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "the request is not a coprocess.Object" in caplog.text
    assert (await client.dispatch(pre_object("ok"))).request.set_headers["X-Tagged"] == "yes"


async def test_policy_continue_echoes_what_was_received(serve: Any) -> None:
    client = await serve(failing_server(error_policy="continue"))
    for sent in (pre_object("raises"), pre_object("fresh"), petstore()):
        data = sent.SerializeToString()
        assert await client.raw(data) == echo(data)
        assert Object.FromString(await client.raw(data)) == textless(data)
    missing = pre_object("ok")
    missing.request.ClearField("return_overrides")
    assert await client.raw(missing.SerializeToString()) == missing.SerializeToString()


async def test_policy_abort_ends_the_call_with_a_status(serve: Any) -> None:
    client = await serve(failing_server(error_policy="abort"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.dispatch(pre_object("raises"))
    assert err.value.code() is grpc.StatusCode.INTERNAL
    assert "secret detail" not in (err.value.details() or "")
    bad = pre_object("ok")
    bad.ClearField("request")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.dispatch(bad)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT


# -- events ------------------------------------------------------------------------------------


async def test_events_by_type_by_handler_name_and_all(
        serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    got: list[tuple[str, str, str]] = []

    def by_type(event: GatewayEvent) -> None:
        got.append(("type", event.type, event.meta["Key"]))

    async def by_name(event: GatewayEvent) -> None:
        got.append(("name", event.handler_name, event.api_id))

    def every(event: GatewayEvent) -> None:
        got.append(("all", event.type, event.payload["spec"]["OrgID"]))

    client = await serve(TykPluginServer(events=[
        EventHandler(by_type, event_type="AuthFailure"),
        EventHandler(by_name, handler_name="audit"),
        EventHandler(every)], **LOCAL))
    payload = event_payload("AuthFailure", {"Key": "k1", "Path": "/x"}, handler_name="audit",
                            api_id="api-1", org_id="org-1")
    assert await client.raw_event(_event(payload)) == b""
    assert got == [("type", "AuthFailure", "k1"), ("name", "audit", "api-1"),
                   ("all", "AuthFailure", "org-1")]
    got.clear()
    await client.raw_event(_event(event_payload("QuotaExceeded", handler_name="other")))
    assert got == [("all", "QuotaExceeded", "")]


async def test_unmatched_events_are_answered_with_a_warning(
        serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    client = await serve(TykPluginServer(**LOCAL))
    with caplog.at_level(logging.WARNING, "calloutkit.tyk"):
        assert await client.raw_event(_event(event_payload("HostDown"))) == b""
    assert "DispatchEvent HostDown (handler ''): no event handler matches" in caplog.text


def _event(payload: str) -> bytes:
    from calloutkit.tyk import Event

    return bytes(Event(payload=payload).SerializeToString())


@pytest.mark.parametrize(("payload", "log"), [
    ("{not json", "event payload is not JSON"),
    ("[1, 2]", "event payload is JSON list, not an object"),
])
async def test_a_malformed_event_is_logged_and_reported(
        serve: Any, caplog: pytest.LogCaptureFixture, payload: str, log: str) -> None:
    seen: list[GatewayEvent] = []
    client = await serve(TykPluginServer(events=[EventHandler(seen.append)], **LOCAL))
    with caplog.at_level(logging.ERROR, "calloutkit.tyk"), \
            pytest.raises(grpc.aio.AioRpcError) as err:
        await client.raw_event(_event(payload))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert log in caplog.text and seen == []
    lenient = await serve(TykPluginServer(events=[EventHandler(seen.append)],
                                          error_policy="continue", **LOCAL))
    assert await lenient.raw_event(_event(payload)) == b""


async def test_a_failing_event_handler_does_not_stop_the_others(
        serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []

    def boom(event: GatewayEvent) -> None:
        raise ValueError("nope")

    client = await serve(TykPluginServer(events=[
        EventHandler(boom), EventHandler(lambda e: seen.append(e.type))], **LOCAL))
    with caplog.at_level(logging.ERROR, "calloutkit.tyk"), \
            pytest.raises(grpc.aio.AioRpcError) as err:
        await client.raw_event(_event(event_payload("KeyExpired")))
    assert err.value.code() is grpc.StatusCode.INTERNAL
    assert seen == ["KeyExpired"] and "handler test_a_failing_event_handler" in caplog.text


# -- concurrency and drain ---------------------------------------------------------------------


def echo_id(call: PluginCall) -> None:
    call.request.set_header("X-Echo", call.request.headers["X-Id"])


async def test_1000_concurrent_dispatch_calls_on_one_channel(serve: Any) -> None:
    async def echo_async(call: PluginCall) -> None:
        await asyncio.sleep(0.001)
        echo_id(call)

    client = await serve(TykPluginServer(
        plugins=[Plugin("sync", echo_id), Plugin("async", echo_async)], **LOCAL))
    objects = [pre_object("sync" if i % 2 else "async", headers=[("X-Id", str(i))])
               for i in range(1000)]
    results = await asyncio.gather(*(client.dispatch(o) for o in objects))
    assert [r.request.set_headers["X-Echo"] for r in results] == [str(i) for i in range(1000)]


async def test_a_plugin_blocking_1s_in_async_code_delays_no_other_call(serve: Any) -> None:
    async def slow(call: PluginCall) -> None:
        await asyncio.sleep(1)

    def slow_sync(call: PluginCall) -> None:
        time.sleep(1)

    client = await serve(TykPluginServer(
        plugins=[Plugin("slow", slow), Plugin("slow_sync", slow_sync), Plugin("fast", echo_id)],
        **LOCAL))
    for name in ("slow", "slow_sync"):
        started = time.monotonic()
        slow_call = asyncio.ensure_future(client.dispatch(pre_object(name)))
        fast = [await client.dispatch(pre_object("fast", headers=[("X-Id", str(i))]))
                for i in range(20)]
        assert not slow_call.done()  # twenty calls answered one after another meanwhile
        assert [f.request.set_headers["X-Echo"] for f in fast] == [str(i) for i in range(20)]
        await slow_call
        assert time.monotonic() - started >= 1.0


async def test_a_call_in_flight_finishes_during_drain() -> None:
    entered = threading.Event()
    release = asyncio.Event()

    async def held(call: PluginCall) -> None:
        entered.set()
        await release.wait()
        call.request.set_header("X-Done", "1")

    server = TykPluginServer(plugins=[Plugin("held", held), Plugin("fast", tag)], **LOCAL)
    async with running(server, grace=10):
        client = Channel(server)
        pending = asyncio.ensure_future(client.dispatch(pre_object("held")))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(server.stop(10))
        while server.serving:
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.dispatch(pre_object("fast"))
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        release.set()
        assert (await pending).request.set_headers["X-Done"] == "1"
        await stopping
        await client.channel.close()


@pytest.mark.no_server
def test_session_state_helper_is_the_generated_message() -> None:
    assert SessionState.DESCRIPTOR.full_name == "coprocess.SessionState"


@pytest.mark.no_server
def test_public_surface_is_sorted_and_documented() -> None:
    import inspect

    import calloutkit.tyk
    import calloutkit.tyk.testing

    for module in (calloutkit.tyk, calloutkit.tyk.testing):
        assert module.__all__ == sorted(module.__all__)
        for name in module.__all__:
            obj = getattr(module, name)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and not obj.__module__.startswith(
                    "calloutkit._generated"):
                assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"
    assert {"TykPluginServer", "Plugin", "PluginCall", "EventHandler", "GatewayEvent", "Hook",
            "Object", "SessionState"} <= set(calloutkit.tyk.__all__)


# -- replies carry only what the gateway reads back ------------------------------------------


def shout(call: PluginCall) -> None:
    if call.hook is Hook.RESPONSE:
        call.response.set_header("X-Shout", "yes")
    else:
        call.request.set_header("X-Shout", "yes")


@pytest.mark.parametrize("name", ["shout", "nobody"])
@pytest.mark.parametrize("hook", [Hook.PRE, Hook.RESPONSE])
async def test_a_3_mib_body_fits_the_gateways_4_mib_receive_limit(serve: Any, hook: Hook,
                                                                   name: str) -> None:
    """The gateway sends a text body next to raw_body but reads only raw_body back; a reply
    echoing both would be 6 MiB, which grpc-go's default 4 MiB receive limit refuses."""
    body = b"x" * (3 * 1024 * 1024)
    request = HttpRequest("POST", "/big", [("Content-Type", "text/plain")], body)
    if hook is Hook.RESPONSE:
        sent = response_object(name, HttpRequest("GET", "/big"), HttpResponse(200, [], body))
    else:
        sent = request_object(hook, name, request)
    assert len(sent.SerializeToString()) > 6 * 1024 * 1024  # text body and raw_body both sent
    client = await serve(TykPluginServer(plugins=[Plugin("shout", shout)], **LOCAL))
    # A client with grpc's default receive limit, 4 MiB, as the gateway has by default.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{client.port}") as channel:
        reply = await channel.unary_unary(DISPATCH)(sent.SerializeToString(), timeout=30)
    returned = Object.FromString(reply)
    part = returned.response if hook is Hook.RESPONSE else returned.request
    assert bytes(part.raw_body) == body and part.body == ""
    if name == "shout":
        headers = part.headers if hook is Hook.RESPONSE else part.set_headers
        assert headers["X-Shout"] == "yes"
