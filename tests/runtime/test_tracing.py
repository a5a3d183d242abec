"""OpenTelemetry spans per callback: parented on the gateway's trace context, in process and
through a real Envoy that traces."""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from conftest import LOOPBACK, free_port, running
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from calloutkit import (
    AuthzServer,
    CalloutServer,
    ConfigError,
    NetworkCalloutServer,
    ProcessingResult,
    allow_request,
    deny_request,
    header_immediate_response,
)
from calloutkit.testing import (
    AuthzClient,
    CalloutClient,
    Envoy,
    NetworkCalloutClient,
    StreamEnded,
    UpstreamServer,
    envoy_config,
    http_headers,
    http_request,
)
from calloutkit.tyk import Hook, Object, Plugin, PluginCall, TykPluginServer
from calloutkit.tyk.testing import HttpRequest, request_object

IN_PROCESS: dict[str, Any] = {"plaintext_address": ("127.0.0.1", 0), "disable_tls": True,
                              "combined_health_check": True}


@pytest.fixture(scope="session")
def exporter() -> InMemorySpanExporter:
    """The process's global tracer provider (settable once), keeping spans in memory."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace.set_tracer_provider(provider)
    return memory


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    exporter.clear()
    yield exporter
    exporter.clear()


def traceparent() -> tuple[str, int, int]:
    """A fresh sampled ``traceparent``, its trace id and its span id."""
    trace_id, span_id = secrets.randbits(128) | 1, secrets.randbits(64) | 1
    return f"00-{trace_id:032x}-{span_id:016x}-01", trace_id, span_id


def of_trace(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans()
            if s.context is not None and s.context.trace_id == trace_id]


class Teapot(CalloutServer):
    async def on_request_headers(self, headers: Any, context: Any) -> Any:
        return None

    def on_response_headers(self, headers: Any, context: Any) -> Any:
        asked = context.request_headers_map
        if "x-boom" in asked:
            raise RuntimeError("boom")
        if "x-teapot" in asked:
            return header_immediate_response(418)
        if "x-abort" in asked:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no entry")
        return None


async def test_in_process_spans_are_children_of_the_metadata_traceparent(
        spans: InMemorySpanExporter) -> None:
    parent, trace_id, span_id = traceparent()
    client = CalloutClient(Teapot(**IN_PROCESS, tracing=True),
                           metadata=[("traceparent", parent), ("x-request-id", "r1")])
    async with client.stream() as stream:
        await stream.request_headers({":path": "/", "x-teapot": "1"})
        reply = await stream.response_headers({":status": "200"})
    assert reply is not None and reply.immediate_response.status.code == 418

    found = {s.name: s for s in of_trace(spans, trace_id)}
    assert set(found) == {"ext_proc request_headers", "ext_proc response_headers"}
    for span in found.values():
        assert span.parent is not None and span.parent.span_id == span_id
        assert span.parent.is_remote
        assert span.kind is SpanKind.SERVER
    first, second = found["ext_proc request_headers"], found["ext_proc response_headers"]
    assert dict(first.attributes or {}) == {
        "calloutkit.protocol": "ext_proc", "calloutkit.phase": "request_headers",
        "calloutkit.callback": "on_request_headers", "calloutkit.outcome": "ok"}
    assert (second.attributes or {})["calloutkit.outcome"] == "immediate_response"
    assert (second.attributes or {})["http.response.status_code"] == 418


async def test_without_metadata_the_request_headers_traceparent_is_the_parent(
        spans: InMemorySpanExporter) -> None:
    parent, trace_id, span_id = traceparent()
    client = CalloutClient(Teapot(**IN_PROCESS, tracing=True))
    async with client.stream() as stream:
        await stream.request_headers({":path": "/", "traceparent": parent, "x-boom": "1"})
        reply = await stream.response_headers({":status": "200"})
    assert reply is not None and reply.immediate_response.status.code == 500  # fail closed

    found = {s.name: s for s in of_trace(spans, trace_id)}
    # The later phase still finds the request's traceparent in the stream's headers.
    assert set(found) == {"ext_proc request_headers", "ext_proc response_headers"}
    assert all(s.parent is not None and s.parent.span_id == span_id for s in found.values())
    failed = found["ext_proc response_headers"]
    assert (failed.attributes or {})["calloutkit.outcome"] == "fail_closed"
    assert (failed.attributes or {})["error.type"] == "RuntimeError"
    assert failed.status.status_code is StatusCode.ERROR
    assert not failed.events  # no exception text leaves with the span


async def test_tracing_is_off_unless_asked_and_on_with_the_variable(
        spans: InMemorySpanExporter) -> None:
    parent, trace_id, _ = traceparent()
    for server in (Teapot(**IN_PROCESS), Teapot(**IN_PROCESS, environ={"CALLOUTKIT_TRACING": "1"}),
                   Teapot(**IN_PROCESS, tracing=False, environ={"CALLOUTKIT_TRACING": "1"})):
        async with CalloutClient(server, metadata=[("traceparent", parent)]).stream() as stream:
            await stream.request_headers({":path": "/"})
    # Only the second server, on through CALLOUTKIT_TRACING, made a span.
    assert [s.name for s in of_trace(spans, trace_id)] == ["ext_proc request_headers"]
    assert Teapot(**IN_PROCESS)._middleware == ()  # off: no wrapper at all


async def test_a_context_abort_is_recorded_as_such(spans: InMemorySpanExporter) -> None:
    parent, trace_id, _ = traceparent()
    client = CalloutClient(Teapot(**IN_PROCESS, tracing=True),
                           metadata=[("traceparent", parent)])
    with pytest.raises(StreamEnded) as ended:
        async with client.stream() as stream:
            await stream.request_headers({":path": "/", "x-abort": "1"})
            await stream.response_headers({":status": "200"})
    assert ended.value.code is grpc.StatusCode.PERMISSION_DENIED

    [span] = [s for s in of_trace(spans, trace_id) if s.name == "ext_proc response_headers"]
    assert (span.attributes or {})["calloutkit.outcome"] == "aborted"
    assert (span.attributes or {})["rpc.grpc.status_code"] == 7
    assert span.status.status_code is StatusCode.UNSET


class Nested(CalloutServer):
    """Spans of its own in both kinds of callback."""

    async def on_request_headers(self, headers: Any, context: Any) -> Any:
        with trace.get_tracer("test").start_as_current_span("async work"):
            return None

    def on_response_headers(self, headers: Any, context: Any) -> Any:
        with trace.get_tracer("test").start_as_current_span("def work"):  # in a pool thread
            return None


async def test_spans_a_callback_starts_are_children_of_its_span(
        spans: InMemorySpanExporter) -> None:
    parent, trace_id, _ = traceparent()
    server = Nested(**LOOPBACK, tracing=True)
    async with running(server):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
            process = channel.stream_stream(
                "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
                request_serializer=pb.ProcessingRequest.SerializeToString,
                response_deserializer=pb.ProcessingResponse.FromString)
            sent = [pb.ProcessingRequest(request_headers=http_headers({":path": "/"})),
                    pb.ProcessingRequest(response_headers=http_headers({":status": "200"}))]
            replies = [r async for r in process(iter(sent), timeout=10,
                                                metadata=[("traceparent", parent)])]
    assert len(replies) == 2

    found = {s.name: s for s in of_trace(spans, trace_id)}
    for mine, callouts in (("async work", "ext_proc request_headers"),
                           ("def work", "ext_proc response_headers")):
        outer = found[callouts].context
        assert outer is not None
        assert found[mine].parent is not None and found[mine].parent.span_id == outer.span_id


class Upper(NetworkCalloutServer):
    def on_read_data(self, data: bytes, end_of_stream: bool, context: Any) -> Any:
        return ProcessingResult(data.upper(), True)


async def test_l4_spans_per_direction_from_the_metadata(spans: InMemorySpanExporter) -> None:
    parent, trace_id, span_id = traceparent()
    client = NetworkCalloutClient(Upper(**IN_PROCESS, tracing=True),
                                  metadata=[("traceparent", parent)])
    async with client.stream() as connection:
        reply = await connection.read(b"hello")
        await connection.read(b"again")
    assert reply.read_data.data == b"HELLO"

    found = of_trace(spans, trace_id)
    assert [s.name for s in found] == ["network_ext_proc read_data"] * 2
    assert all(s.parent is not None and s.parent.span_id == span_id for s in found)


def test_bad_tracing_settings_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"^CALLOUTKIT_TRACING='maybe': expected true or"):
        Teapot(**IN_PROCESS, environ={"CALLOUTKIT_TRACING": "maybe"})
    # As without calloutkit[otel]: the module cannot be found.
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", None)
    with pytest.raises(ConfigError, match=r"^tracing needs OpenTelemetry: pip install "
                                          r"'calloutkit\[otel\]'$"):
        Teapot(**IN_PROCESS, tracing=True)
    Teapot(**IN_PROCESS)  # off, it needs nothing


def tracing_envoy_config(callout_port: int, upstream_port: int,
                         collector_port: int) -> dict[str, Any]:
    """The usual ext_proc bootstrap with Envoy's OpenTelemetry tracer on; its collector
    cluster points at a closed port (the spans calloutkit sees do not need it)."""
    config = envoy_config(callout_port, upstream_port)
    resources = config["static_resources"]
    hcm = resources["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["tracing"] = {"provider": {"name": "envoy.tracers.opentelemetry", "typed_config": {
        "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
        "grpc_service": {"envoy_grpc": {"cluster_name": "collector"}},
        "service_name": "envoy"}}}
    callout = next(c for c in resources["clusters"] if c["name"] == "callout")
    collector = {**callout, "name": "collector", "load_assignment": {
        "cluster_name": "collector", "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1",
                                           "port_value": collector_port}}}}]}]}}
    resources["clusters"].append(collector)
    return config


class Recording(Teapot):
    """Keeps the ``traceparent`` of each stream's gRPC metadata, as Envoy sent it."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.sent: list[str | None] = []

    async def on_request_headers(self, headers: Any, context: Any) -> Any:
        self.sent.append(dict(context.invocation_metadata()).get("traceparent"))
        return None


@pytest.mark.envoy
@pytest.mark.parametrize("transport", ["grpcio", "native"])
@pytest.mark.parametrize("envoy_traces", [True, False], ids=["envoy-traces", "envoy-does-not"])
async def test_a_span_in_the_clients_trace_through_envoy(
        spans: InMemorySpanExporter, upstream: UpstreamServer, envoy_traces: bool,
        transport: str) -> None:
    parent, trace_id, span_id = traceparent()
    server = Recording(**LOOPBACK, tracing=True, transport=transport)
    async with running(server):
        port = server.plaintext_port or 0
        config = (tracing_envoy_config(port, upstream.port, free_port()) if envoy_traces
                  else envoy_config(port, upstream.port))
        with Envoy(config) as envoy:
            reply = await asyncio.to_thread(http_request, envoy.url + "/traced",
                                            headers=[("traceparent", parent)])
            assert reply.status == 200
            deadline = time.monotonic() + 5
            while len(of_trace(spans, trace_id)) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)

    found = {s.name: s for s in of_trace(spans, trace_id)}
    assert set(found) == {"ext_proc request_headers", "ext_proc response_headers"}
    [sent] = server.sent
    if envoy_traces:
        # Envoy puts its own span (the ext_proc call's) in the gRPC metadata, in the client's
        # trace: that span is the parent, not the client's.
        assert sent is not None and sent.split("-")[1] == f"{trace_id:032x}"
        expected = int(sent.split("-")[2], 16)
        assert expected != span_id
    else:
        # No tracing in Envoy: no traceparent in the metadata; the client's own header, which
        # reaches the callout in the request headers, is the parent.
        assert sent is None
        expected = span_id
    for span in found.values():
        assert span.parent is not None and span.parent.is_remote
        assert span.parent.span_id == expected


class KeyCheck(AuthzServer):
    async def on_check(self, request: Any, context: Any) -> Any:
        # A span the callback starts is a child of calloutkit's.
        with trace.get_tracer("test").start_as_current_span("lookup"):
            pass
        return deny_request(401) if "x-api-key" not in request.headers else allow_request()


async def test_ext_authz_check_spans_from_metadata_or_the_checked_headers(
        spans: InMemorySpanExporter) -> None:
    in_metadata, trace_a, span_a = traceparent()
    in_headers, trace_b, span_b = traceparent()
    server = KeyCheck(**IN_PROCESS, tracing=True)
    reply = await AuthzClient(server, metadata=[("traceparent", in_metadata)]).check()
    assert reply.denied_response.status.code == 401
    reply = await AuthzClient(server).check(headers={"traceparent": in_headers,
                                                     "x-api-key": "k"})
    assert reply.HasField("ok_response")

    by_trace = {trace_id: {s.name: s for s in of_trace(spans, trace_id)}
                for trace_id in (trace_a, trace_b)}
    denied, allowed = by_trace[trace_a]["ext_authz check"], by_trace[trace_b]["ext_authz check"]
    assert denied.parent is not None and denied.parent.span_id == span_a
    assert allowed.parent is not None and allowed.parent.span_id == span_b
    assert (denied.attributes or {})["calloutkit.outcome"] == "denied"
    assert (denied.attributes or {})["http.response.status_code"] == 401
    assert (allowed.attributes or {})["calloutkit.outcome"] == "ok"
    for found in by_trace.values():
        lookup, check = found["lookup"], found["ext_authz check"]
        assert lookup.parent is not None and check.context is not None
        assert lookup.parent.span_id == check.context.span_id


def reject_anonymous(call: PluginCall) -> None:
    if "Authorization" not in call.request.headers:
        call.reject(401, "who are you?")


async def test_tyk_spans_over_grpc_from_the_dispatched_requests_headers(
        spans: InMemorySpanExporter) -> None:
    parent, trace_id, span_id = traceparent()
    server = TykPluginServer(plugins=[Plugin("check", reject_anonymous)], tracing=True,
                             plaintext_address=("127.0.0.1", 0), combined_health_check=True)
    async with running(server):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
            dispatch = channel.unary_unary("/coprocess.Dispatcher/Dispatch")
            # Tyk canonicalises header names: the gateway sends "Traceparent".
            sent = request_object(Hook.PRE, "check", HttpRequest(
                headers=[("Traceparent", parent)]), api_id="api-1", org_id="org")
            reply = Object.FromString(await dispatch(sent.SerializeToString(), timeout=10))
    assert reply.request.return_overrides.response_code == 401

    [span] = of_trace(spans, trace_id)
    assert span.name == "tyk pre"
    assert span.parent is not None and span.parent.span_id == span_id
    assert (span.attributes or {})["calloutkit.callback"] == "check"
