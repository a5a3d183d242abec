"""Prometheus metrics at /metrics: exact counts after known traffic, over real gRPC and HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import grpc
import pytest
from conftest import free_port, read_all, running, spawn, stop_process
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

from calloutkit import (
    AuthzServer,
    CallInfo,
    CalloutServer,
    ConfigError,
    NetworkCalloutServer,
    deny_request,
    header_immediate_response,
)
from calloutkit.testing import http_headers
from calloutkit.tyk import Plugin, PluginCall, TykPluginServer

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
LOCAL: dict[str, Any] = {"plaintext_address": ("127.0.0.1", 0), "disable_tls": True,
                         "health_check_address": ("127.0.0.1", 0)}


def scrape(port: int, path: str = "/metrics") -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
        return reply.read().decode(), reply.headers["Content-Type"]


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample by name and labels (a worker's pid label, in multiprocess mode, dropped)."""
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset((k, v) for k, v in sample.labels.items() if k != "pid")
            key = (sample.name, labels)
            found[key] = found.get(key, 0.0) + sample.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


async def l7_stream(channel: grpc.aio.Channel,
                    headers: dict[str, str]) -> list[pb.ProcessingResponse]:
    call = channel.stream_stream(METHOD,
                                 request_serializer=pb.ProcessingRequest.SerializeToString,
                                 response_deserializer=pb.ProcessingResponse.FromString)
    requests = [pb.ProcessingRequest(request_headers=http_headers({":path": "/", **headers})),
                pb.ProcessingRequest(response_headers=http_headers({":status": "200"}))]
    return [reply async for reply in call(iter(requests), timeout=10)]


class Teapot(CalloutServer):
    async def on_request_headers(self, headers: Any, context: Any) -> Any:
        return None

    def on_response_headers(self, headers: Any, context: Any) -> Any:
        asked = {h.key for h in context.request_headers.headers.headers}
        if "x-boom" in asked:
            raise RuntimeError("boom")
        if "x-teapot" in asked:
            return header_immediate_response(418)
        return None


TRANSPORTS = ["grpcio", "native"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_l7_counts_streams_phases_latency_errors_and_immediate_responses(
        transport: str) -> None:
    seen: list[str] = []

    async def mine(call: CallInfo, proceed: Any) -> Any:
        seen.append(call.phase)
        return await proceed()

    server = Teapot(**LOCAL, middleware=[mine], server_thread_count=3, transport=transport)
    async with running(server):
        assert server.health_check_port is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
            asked = [{}] * 7 + [{"x-teapot": "1"}] * 2 + [{"x-boom": "1"}]
            replies = await asyncio.gather(*(l7_stream(channel, h) for h in asked))
        assert [r[1].immediate_response.status.code for r in replies[7:]] == [418, 418, 500]
        text, kind = await asyncio.to_thread(scrape, server.health_check_port)
        # Health still answers on the same listener.
        assert (await asyncio.to_thread(scrape, server.health_check_port, "/"))[0] == ""
    assert kind.startswith("text/plain; version=")
    found = samples(text)
    kind_ = {"kind": "ext_proc"}
    assert value(found, "calloutkit_streams_started_total", **kind_) == 10
    assert value(found, "calloutkit_streams_active", **kind_) == 0
    for phase in ("request_headers", "response_headers"):
        assert value(found, "calloutkit_messages_total", **kind_, phase=phase) == 10
        assert value(found, "calloutkit_callback_duration_seconds_count", **kind_,
                     phase=phase) == 10
        assert value(found, "calloutkit_callback_duration_seconds_bucket", **kind_,
                     phase=phase, le="+Inf") == 10
        assert value(found, "calloutkit_callback_duration_seconds_sum", **kind_,
                     phase=phase) > 0
    assert value(found, "calloutkit_callback_errors_total", **kind_,
                 phase="response_headers", outcome="fail_closed") == 1
    assert value(found, "calloutkit_callback_errors_total", **kind_,
                 phase="request_headers", outcome="fail_closed") is None
    assert value(found, "calloutkit_immediate_responses_total", **kind_, status="418") == 2
    assert value(found, "calloutkit_immediate_responses_total", **kind_, status="500") == 1
    assert value(found, "calloutkit_draining", **kind_) == 0
    assert value(found, "calloutkit_callback_threads", **kind_, state="limit") == 3
    assert value(found, "calloutkit_callback_threads", **kind_, state="stuck") == 0
    assert value(found, "calloutkit_callback_threads", **kind_, state="busy") == 0
    assert seen.count("request_headers") == seen.count("response_headers") == 10


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_draining_shows_and_a_stuck_thread_is_counted(transport: str) -> None:
    class Stuck(CalloutServer):
        def on_request_headers(self, headers: Any, context: Any) -> Any:
            time.sleep(1.5)  # past callback_timeout: its thread counts as stuck meanwhile

    server = Stuck(**LOCAL, callback_timeout=0.3, drain_delay=1, transport=transport)
    async with running(server):
        assert server.health_check_port is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
            replies = await l7_stream(channel, {})
        assert replies[0].immediate_response.status.code == 500
        found = samples((await asyncio.to_thread(scrape, server.health_check_port))[0])
        assert value(found, "calloutkit_callback_threads", kind="ext_proc", state="stuck") == 1
        assert value(found, "calloutkit_callback_errors_total", kind="ext_proc",
                     phase="request_headers", outcome="fail_closed") == 1
        assert value(found, "calloutkit_draining", kind="ext_proc") == 0
        stopping = asyncio.ensure_future(server.stop(0))
        await asyncio.sleep(0.2)  # within drain_delay: the listener still answers
        found = samples((await asyncio.to_thread(scrape, server.health_check_port))[0])
        assert value(found, "calloutkit_draining", kind="ext_proc") == 1
        await stopping


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_server_kind_is_labelled_with_its_kind(transport: str) -> None:
    class Net(NetworkCalloutServer):
        def on_read_data(self, data: bytes, end_of_stream: bool, context: Any) -> Any:
            return None

    class Authz(AuthzServer):
        async def on_check(self, request: Any, context: Any) -> Any:
            return deny_request(403, "no") if request.path == "/no" else None

    def pre(call: PluginCall) -> None:
        raise RuntimeError("boom")

    authz = Authz(**LOCAL, error_policy="continue", transport=transport)
    tyk = TykPluginServer(**LOCAL, plugins=[Plugin("Pre", pre, hook="pre")], transport=transport)
    net = Net(**LOCAL, transport=transport)
    async with running(authz), running(tyk), running(net):
        from calloutkit.authz._client import check_request
        from calloutkit.tyk.testing import HttpRequest, request_object

        async with grpc.aio.insecure_channel(f"127.0.0.1:{authz.plaintext_port}") as channel:
            check = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")
            for path in ("/", "/no", "/"):
                await check(check_request("GET", path).SerializeToString(), timeout=10)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{tyk.plaintext_port}") as channel:
            dispatch = channel.unary_unary("/coprocess.Dispatcher/Dispatch")
            for _ in range(4):
                await dispatch(request_object("pre", "Pre", HttpRequest("GET", "/"))
                               .SerializeToString(), timeout=10)
        assert authz.health_check_port and tyk.health_check_port and net.health_check_port
        a = samples((await asyncio.to_thread(scrape, authz.health_check_port))[0])
        t = samples((await asyncio.to_thread(scrape, tyk.health_check_port))[0])
        n = samples((await asyncio.to_thread(scrape, net.health_check_port))[0])
    assert value(a, "calloutkit_streams_started_total", kind="ext_authz") == 3
    assert value(a, "calloutkit_messages_total", kind="ext_authz", phase="check") == 3
    assert value(a, "calloutkit_callback_duration_seconds_count", kind="ext_authz",
                 phase="check") == 3
    assert value(t, "calloutkit_streams_started_total", kind="tyk") == 4
    assert value(t, "calloutkit_messages_total", kind="tyk", phase="pre") == 4
    assert value(t, "calloutkit_callback_errors_total", kind="tyk", phase="pre",
                 outcome="fail_closed") == 4
    assert value(n, "calloutkit_streams_started_total", kind="network_ext_proc") == 0


async def test_metrics_off_and_on_an_address_of_their_own() -> None:
    off = Teapot(**LOCAL, metrics=False)
    assert off._middleware == ()
    async with running(off):
        assert off.health_check_port is not None
        assert (await asyncio.to_thread(scrape, off.health_check_port))[0] == ""  # health
    apart = Teapot(**{**LOCAL, "combined_health_check": True},
                   metrics_address=("127.0.0.1", 0))
    async with running(apart):
        assert apart.metrics_listener_port is not None
        text, _ = await asyncio.to_thread(scrape, apart.metrics_listener_port)
        assert "calloutkit_streams_started_total" in text
        with pytest.raises(urllib.error.HTTPError) as missing:
            await asyncio.to_thread(scrape, apart.metrics_listener_port, "/")
        assert missing.value.code == 404
        missing.value.close()
    # Without an HTTP listener metrics are off, unless asked for by name.
    assert not Teapot(**{**LOCAL, "combined_health_check": True}).config.metrics
    with pytest.raises(ConfigError, match="metrics need an HTTP listener"):
        Teapot(**{**LOCAL, "combined_health_check": True}, metrics=True)
    with pytest.raises(ConfigError, match="metrics_address with metrics off"):
        Teapot(**LOCAL, metrics=False, metrics_address=("127.0.0.1", 0))
    with pytest.raises(ConfigError, match="CALLOUTKIT_METRICS_ADDRESS"):
        Teapot(**LOCAL, environ={"CALLOUTKIT_METRICS_ADDRESS": "nowhere"})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers need Linux")
def test_workers_add_up_across_processes(temp_dir: str) -> None:
    port, health = free_port(), free_port()
    process = spawn([sys.executable, "-m", "calloutkit", "serve", "tests/servers/pid_server.py",
                     "--plaintext_address", f"127.0.0.1:{port}", "--health_check_address",
                     f"127.0.0.1:{health}", "--disable_tls", "--workers", "2"])
    try:
        read_all(process, {"supervisor": 1, "serving:": 2})
        assert len(os.listdir(temp_dir)) == 1  # the supervisor's metrics folder

        async def traffic() -> set[str]:
            pids = set()
            for _ in range(20):  # a connection each, so the kernel spreads them
                async with grpc.aio.insecure_channel(
                        f"127.0.0.1:{port}",
                        options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                    replies = await l7_stream(channel, {})
                mutation = replies[0].request_headers.response.header_mutation
                pids.add(mutation.set_headers[0].header.raw_value.decode())
            return pids

        pids = asyncio.run(traffic())
        assert len(pids) == 2
        for _ in range(3):  # whichever worker answers, the sum is the same
            found = samples(scrape(health)[0])
            assert value(found, "calloutkit_streams_started_total", kind="ext_proc") == 20
            assert value(found, "calloutkit_messages_total", kind="ext_proc",
                         phase="request_headers") == 20
            assert value(found, "calloutkit_callback_duration_seconds_count", kind="ext_proc",
                         phase="request_headers") == 20
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(30) == 0
        assert os.listdir(temp_dir) == []  # the supervisor removed its folder
    finally:
        stop_process(process)
