"""Malformed input on every server kind, over real gRPC on loopback.

Each server kind gets 10,000 fuzzed messages from a seeded generator (random bytes, truncated
and bit-flipped valid messages, deep nesting), sent as raw bytes. Every call must end OK or
INVALID_ARGUMENT with a fixed text (no exception text, type name, path or traceback), the
log must stay a handful of lines, and the server must answer a normal request afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import re
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import LOOPBACK
from envoy.service.auth.v3 import attribute_context_pb2
from envoy.service.auth.v3 import external_auth_pb2 as apb
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.network_ext_proc.v3 import network_external_processor_pb2 as npb
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from calloutkit import (
    AuthzServer,
    BaseServer,
    CalloutServer,
    NetworkCalloutServer,
    ProcessingResult,
    add_header_mutation,
    allow_request,
)
from calloutkit.runtime._malformed import MalformedInput
from calloutkit.testing import check_request, http_body, http_headers
from calloutkit.tyk import (
    Event,
    EventHandler,
    GatewayEvent,
    Hook,
    Object,
    Plugin,
    PluginCall,
    TykPluginServer,
)
from calloutkit.tyk.testing import HttpRequest, event_payload, request_object

COUNT = 10_000
CLIENT = Path(__file__).with_name("raw_client.py")
# What a reply to a peer must never carry: exception text, a Python type name, a path.
LEAKS = re.compile(r"Traceback|<class|\w+Error\b|Exception|\.py\b|/\w|Wire format|"
                   r"[Pp]arsing|recursion|File \"")

L7 = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
L4 = "/envoy.service.network_ext_proc.v3.NetworkExternalProcessor/Process"
CHECK = "/envoy.service.auth.v3.Authorization/Check"
DISPATCH = "/coprocess.Dispatcher/Dispatch"
EVENT = "/coprocess.Dispatcher/DispatchEvent"
HEALTH = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


# -- the fuzzed messages -------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def nested_groups(rng: random.Random) -> bytes:
    """An unknown field of group type nested past any parser's depth limit."""
    number = rng.randrange(1000, 5000)
    depth = rng.randrange(150, 3000)
    return (_varint(number << 3 | 3) * depth) + (_varint(number << 3 | 4) * depth)


def nested_struct(rng: random.Random, field: int) -> bytes:
    """Message field ``field`` (a map<string, Struct>) holding lists nested 150-1000 deep."""
    value = b""
    for _ in range(rng.randrange(150, 1000)):
        value = _field(6, _field(1, value))  # Value.list_value -> ListValue.values -> Value
    struct = _field(1, _field(1, b"a") + _field(2, value))  # Struct.fields {"a": value}
    return _field(field, _field(1, b"k") + _field(2, struct))


def fuzz(rng: random.Random, valid: list[bytes], deep: Callable[[random.Random], bytes],
         count: int = COUNT) -> list[bytes]:
    """``count`` messages: random bytes, truncated and bit-flipped valid ones, deep nesting."""
    out = []
    for _ in range(count):
        kind = rng.random()
        base = rng.choice(valid)
        if kind < 0.3:
            out.append(rng.randbytes(rng.randrange(1, 80)))
        elif kind < 0.6:
            out.append(base[:rng.randrange(1, len(base))])
        elif kind < 0.9:
            flipped = bytearray(base)
            for _ in range(rng.randrange(1, 4)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            out.append(bytes(flipped))
        else:
            out.append(deep(rng))
    return out


def parses(message_type: Any, data: bytes) -> bool:
    try:
        message_type.FromString(data)
    except Exception:
        return False
    return True


# -- sending them ------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    replies: list[bytes]


class Served:
    """A started server, a channel to it, and a folder for the client's files."""

    def __init__(self, server: BaseServer, folder: Path) -> None:
        self.server, self.folder = server, folder
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}")

    async def send_all(self, method: str, messages: list[bytes],
                       streaming: bool) -> list[Outcome]:
        """Each message on a call of its own (a malformed one ends its stream), many at a
        time on one connection, from a client process of its own (`raw_client.py`), so the
        server and the client each get a core."""
        source, target = self.folder / "messages", self.folder / "outcomes"
        source.write_bytes(b"".join(len(m).to_bytes(4, "big") + m for m in messages))
        client = await asyncio.create_subprocess_exec(
            sys.executable, str(CLIENT), str(self.server.plaintext_port), method,
            "stream" if streaming else "unary", str(source), str(target),
            start_new_session=True)
        try:
            assert await asyncio.wait_for(client.wait(), timeout=240) == 0
        finally:
            if client.returncode is None:
                os.killpg(client.pid, signal.SIGKILL)
                await client.wait()
        outcomes = []
        for line in target.read_text().splitlines():
            item = json.loads(line)
            outcomes.append(Outcome(grpc.StatusCode[item["code"]], item["details"],
                                    [base64.b64decode(r) for r in item["replies"]]))
        assert len(outcomes) == len(messages)
        return outcomes

    async def once(self, method: str, data: bytes, streaming: bool) -> list[bytes]:
        """One well-formed request from the test itself; its replies."""
        if streaming:
            call = self.channel.stream_stream(method)(iter([data]), timeout=10)
            return [reply async for reply in call]
        return [await self.channel.unary_unary(method)(data, timeout=10)]


def check_outcomes(messages: list[bytes], outcomes: list[Outcome], message_type: Any,
                   details: str, caplog: pytest.LogCaptureFixture,
                   allowed: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.OK}),
                   ) -> Counter[grpc.StatusCode]:
    codes: Counter[grpc.StatusCode] = Counter()
    for data, outcome in zip(messages, outcomes, strict=True):
        codes[outcome.code] += 1
        assert not LEAKS.search(outcome.details), outcome.details
        for reply in outcome.replies:
            assert b"Traceback" not in reply and b"DecodeError" not in reply
        if not parses(message_type, data):
            assert (outcome.code, outcome.details) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                       details), data[:64]
        else:
            assert outcome.code in allowed | {grpc.StatusCode.INVALID_ARGUMENT}, outcome
            if outcome.code is grpc.StatusCode.INVALID_ARGUMENT:
                assert outcome.details == details
    # The corpus does exercise both answers.
    assert codes[grpc.StatusCode.INVALID_ARGUMENT] > COUNT // 4, codes
    assert codes[grpc.StatusCode.OK] > 0, codes
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) < 50, Counter(r.getMessage()[:80] for r in loud).most_common(5)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert "Traceback" not in caplog.text
    return codes


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[[BaseServer], Any]]:
    started: list[Served] = []

    async def start(server: BaseServer) -> Served:
        await server.start()
        started.append(Served(server, tmp_path))
        return started[-1]

    yield start
    for served in started:
        await served.channel.close()
        await served.server.stop(1)


@pytest.fixture
def loud(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every record from WARNING up, calloutkit's and grpc's alike."""
    caplog.set_level(logging.WARNING)
    return caplog


# -- the server kinds ------------------------------------------------------------------------


class Tagging(CalloutServer):
    def on_request_headers(self, headers: Any, context: Any) -> Any:
        return add_header_mutation(add=[("x-tagged", "yes")])


async def test_l7_process(serve: Any, loud: pytest.LogCaptureFixture) -> None:
    served = await serve(Tagging(**LOOPBACK))
    valid = [pb.ProcessingRequest(request_headers=http_headers(
                 {":path": "/a/b?c=d", ":method": "POST", "x-key": "value"})),
             pb.ProcessingRequest(request_body=http_body(b"some body bytes")),
             pb.ProcessingRequest(response_headers=http_headers({":status": "200"}))]
    attributes = pb.ProcessingRequest.DESCRIPTOR.fields_by_name["attributes"].number
    messages = fuzz(random.Random(7), [m.SerializeToString() for m in valid],
                    lambda rng: (nested_struct(rng, attributes) if rng.random() < 0.5
                                 else nested_groups(rng)))
    outcomes = await served.send_all(L7, messages, streaming=True)
    check_outcomes(messages, outcomes, pb.ProcessingRequest,
                   "malformed request: expected envoy.service.ext_proc.v3.ProcessingRequest",
                   loud)
    [reply] = await served.once(L7, valid[0].SerializeToString(), True)
    mutation = pb.ProcessingResponse.FromString(reply).request_headers.response.header_mutation
    assert [h.header.key for h in mutation.set_headers] == ["x-tagged"]


class Upper(NetworkCalloutServer):
    def on_read_data(self, data: bytes, end_of_stream: bool, context: Any) -> Any:
        return ProcessingResult(data.upper(), modified=True)


async def test_l4_process(serve: Any, loud: pytest.LogCaptureFixture) -> None:
    served = await serve(Upper(**LOOPBACK))
    valid = [npb.ProcessingRequest(read_data=npb.Data(data=b"hello there", end_of_stream=False)),
             npb.ProcessingRequest(write_data=npb.Data(data=b"answer", end_of_stream=True))]
    messages = fuzz(random.Random(4), [m.SerializeToString() for m in valid], nested_groups)
    outcomes = await served.send_all(L4, messages, streaming=True)
    check_outcomes(messages, outcomes, npb.ProcessingRequest,
                   "malformed request: expected "
                   "envoy.service.network_ext_proc.v3.ProcessingRequest", loud)
    [reply] = await served.once(L4, valid[0].SerializeToString(), True)
    assert npb.ProcessingResponse.FromString(reply).read_data.data == b"HELLO THERE"


class PathCheck(AuthzServer):
    def on_check(self, request: Any, context: Any) -> Any:
        return allow_request(headers_to_set=[("x-path", request.path)])


async def test_ext_authz_check(serve: Any, loud: pytest.LogCaptureFixture) -> None:
    served = await serve(PathCheck(**LOOPBACK))
    valid = [check_request("GET", "/orders/7", headers={"x-api-key": "k"}),
             check_request("POST", "/upload?x=1", body=b"payload")]
    attributes = apb.CheckRequest.DESCRIPTOR.fields_by_name["attributes"].number
    context = attribute_context_pb2.AttributeContext.DESCRIPTOR
    metadata = context.fields_by_name["metadata_context"].number

    def deep(rng: random.Random) -> bytes:
        if rng.random() < 0.5:
            return nested_groups(rng)
        # attributes.metadata_context.filter_metadata{"k": Struct nested deep}
        return _field(attributes, _field(metadata, nested_struct(rng, 1)))

    messages = fuzz(random.Random(11), [m.SerializeToString() for m in valid], deep)
    outcomes = await served.send_all(CHECK, messages, streaming=False)
    check_outcomes(messages, outcomes, apb.CheckRequest,
                   "authz server: the request is not a CheckRequest", loud)
    [reply] = await served.once(CHECK, valid[0].SerializeToString(), False)
    headers = apb.CheckResponse.FromString(reply).ok_response.headers
    assert [(h.header.key, h.header.value) for h in headers] == [("x-path", "/orders/7")]


def tag(call: PluginCall) -> None:
    call.request.set_header("X-Tagged", "yes")


async def test_tyk_dispatch(serve: Any, loud: pytest.LogCaptureFixture) -> None:
    served = await serve(TykPluginServer(plugins=[Plugin("fuzz", tag, hook=Hook.PRE)],
                                          **LOOPBACK))
    valid = [request_object(Hook.PRE, "fuzz", HttpRequest(url="/a?b=c", headers=[("K", "v")]),
                            api_id="api-1", org_id="org").SerializeToString(),
             request_object(Hook.POST, "other", HttpRequest(method="POST", body=b"x=1"),
                            api_id="api-2", org_id="org").SerializeToString()]
    messages = fuzz(random.Random(13), valid, nested_groups)
    outcomes = await served.send_all(DISPATCH, messages, streaming=False)
    check_outcomes(messages, outcomes, Object,
                   "plugin server: the request is not a coprocess.Object", loud)
    [reply] = await served.once(DISPATCH, valid[0], False)
    assert Object.FromString(reply).request.set_headers["X-Tagged"] == "yes"


def deep_json(rng: random.Random) -> bytes:
    depth = rng.randrange(1_000, 20_001)
    opening, closing = rng.choice([("[", "]"), ('{"a":', "}")])
    inner = opening * depth + "1" + closing * depth
    return bytes(Event(payload=inner).SerializeToString())


async def test_tyk_dispatch_event(serve: Any, loud: pytest.LogCaptureFixture) -> None:
    seen: list[GatewayEvent] = []
    served = await serve(TykPluginServer(events=[EventHandler(seen.append)], **LOOPBACK))
    valid = [Event(payload=event_payload("AuthFailure", {"Key": "k1", "Path": "/x"},
                                         handler_name="audit", api_id="api-1",
                                         org_id="org-1")).SerializeToString(),
             Event(payload=event_payload("QuotaExceeded")).SerializeToString()]
    messages = fuzz(random.Random(17), valid, deep_json)
    outcomes = await served.send_all(EVENT, messages, streaming=False)
    details = "plugin server: malformed event"
    check_outcomes(messages, outcomes, Event, details, loud)
    for data, outcome in zip(messages, outcomes, strict=True):
        if outcome.code is grpc.StatusCode.OK:  # only for a payload that is a JSON object
            assert isinstance(json.loads(Event.FromString(data).payload), dict)
    seen.clear()
    assert await served.once(EVENT, valid[0], False) == [b""]
    assert [event.type for event in seen] == ["AuthFailure"]


async def test_nested_json_in_an_event_is_invalid_argument(
        serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    served = await serve(TykPluginServer(events=[EventHandler(lambda event: None)],
                                          **LOOPBACK))
    call = served.channel.unary_unary(EVENT)
    caplog.set_level(logging.ERROR)
    for depth in (1_000, 5_000, 20_000):
        payload = "[" * depth + "]" * depth
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(Event(payload=payload).SerializeToString(), timeout=30)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "plugin server: malformed event"
    assert "event payload is JSON nested too deeply" in caplog.text
    assert len(caplog.records) == 1  # the next two fell in the same interval
    assert "Traceback" not in caplog.text


async def test_grpc_health(serve: Any, loud: pytest.LogCaptureFixture) -> None:
    served = await serve(Tagging(**LOOPBACK))
    valid = [health_pb2.HealthCheckRequest(service="x").SerializeToString(),
             health_pb2.HealthCheckRequest(
                 service="envoy.service.ext_proc.v3.ExternalProcessor").SerializeToString()]
    messages = fuzz(random.Random(19), valid, nested_groups)
    outcomes = await served.send_all(HEALTH, messages, streaming=False)
    # A request that parses names a service; one the server does not know is NOT_FOUND.
    check_outcomes(messages, outcomes, health_pb2.HealthCheckRequest, "malformed request",
                   loud, allowed=frozenset({grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND}))
    [reply] = await served.once(HEALTH, valid[1], False)
    assert health_pb2.HealthCheckResponse.FromString(reply).status == \
        health_pb2.HealthCheckResponse.SERVING


async def test_health_watch_and_reflection_refuse_a_malformed_request(
        serve: Any, loud: pytest.LogCaptureFixture) -> None:
    served = await serve(TykPluginServer(**LOOPBACK))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await anext(aiter(served.channel.unary_stream(WATCH)(b"\xff\xff", timeout=10)))
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                       "malformed request")
    loud.clear()
    [bad] = await served.send_all(REFLECTION, [b"\xff\xff\xff"], streaming=True)
    assert (bad.code, bad.details) == (grpc.StatusCode.INVALID_ARGUMENT, "malformed request")
    good = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    [ok] = await served.send_all(REFLECTION, [good], streaming=True)
    [reply] = ok.replies
    services = reflection_pb2.ServerReflectionResponse.FromString(reply)
    assert "coprocess.Dispatcher" in [s.name for s in services.list_services_response.service]
    assert len(loud.records) == 1 and not loud.records[0].exc_info


async def test_the_log_line_is_rate_limited_and_counts_what_it_kept_quiet(
        serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    served = await serve(Tagging(**LOOPBACK))
    caplog.set_level(logging.ERROR)
    outcomes = await served.send_all(L7, [b"\xff"] * 5, streaming=True)
    assert {o.code for o in outcomes} == {grpc.StatusCode.INVALID_ARGUMENT}
    [record] = caplog.records
    assert record.getMessage().startswith("Process: malformed request from ipv4:127.0.0.1:")
    caplog.clear()
    malformed = MalformedInput(logging.getLogger("calloutkit.test"), "bad", interval=0.2)
    aborts = [malformed(f"problem {n}") for n in range(4)]
    assert {(a.code, a.details) for a in aborts} == {(grpc.StatusCode.INVALID_ARGUMENT, "bad")}
    await asyncio.sleep(0.25)
    malformed("problem 4")
    assert [r.getMessage() for r in caplog.records] == [
        "problem 0", "problem 4 (and 3 more like it since the last line)"]
