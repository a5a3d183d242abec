"""calloutkit proxy end to end: a real Envoy routing ext_proc streams through the proxy, a
backend killed mid-stream and restarted, and Tyk plugin calls routed per API."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from proxy_testservice import (
    HERE,
    SERVER,
    EchoBackend,
    no_leftovers,  # noqa: F401 (autouse: no task left behind)
    parse_routes,
    protos,
)

from calloutkit import CalloutServer, add_header_mutation
from calloutkit.proxy import ProxyServer
from calloutkit.testing import Envoy, UpstreamServer, envoy_config, http_request

pb, pb_grpc = protos()







# -- (a) Envoy ext_proc streams routed by grpc_service.initial_metadata -----------------------

class Tagger(CalloutServer):
    """Tags every response with the name of the callout server that processed it."""

    def __init__(self, tag: str, **options: Any) -> None:
        super().__init__(**options)
        self.tag = tag
        self.streams = 0

    async def on_request_headers(self, headers: Any, context: Any) -> None:
        self.streams += 1

    async def on_response_headers(self, headers: Any, context: Any) -> Any:
        return add_header_mutation(add=[("x-callout", self.tag)])


def _two_routes(config: dict[str, Any]) -> dict[str, Any]:
    """Route /b/ with per-route ext_proc metadata overriding the filter's x-callout."""
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    routes.insert(0, {
        "match": {"prefix": "/b/"}, "route": {"cluster": "upstream", "timeout": "60s"},
        "typed_per_filter_config": {"envoy.filters.http.ext_proc": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3."
                     "ExtProcPerRoute",
            "overrides": {"grpc_initial_metadata": [{"key": "x-callout", "value": "b"}]}}}})
    return config


@pytest.mark.envoy
async def test_envoy_ext_proc_streams_routed_by_metadata() -> None:
    a, b = Tagger("a", **SERVER), Tagger("b", **SERVER)
    await a.start()
    await b.start()
    proxy = ProxyServer(parse_routes(f"""
        backends:
          a: {{targets: 127.0.0.1:{a.plaintext_port}}}
          b: {{targets: 127.0.0.1:{b.plaintext_port}}}
        routes:
          - match:
              method: /envoy.service.ext_proc.v3.ExternalProcessor/Process
              metadata: {{x-callout: a}}
            backend: a
          - match:
              method: /envoy.service.ext_proc.v3.ExternalProcessor/Process
              metadata: {{x-callout: b}}
            backend: b
        """), **SERVER)
    await proxy.start()
    try:
        assert proxy.plaintext_port is not None
        with UpstreamServer() as upstream:
            config = _two_routes(envoy_config(proxy.plaintext_port, upstream.port,
                                              initial_metadata={"x-callout": "a"}))
            with Envoy(config) as envoy:
                for path, tag in [("/a/1", "a"), ("/b/1", "b"), ("/x", "a"), ("/b/2", "b")]:
                    response = await asyncio.to_thread(http_request, envoy.url + path)
                    assert response.status == 200, envoy.log_tail()
                    assert response.header("x-callout") == tag, path
                stats = envoy.stats()
        assert (a.streams, b.streams) == (2, 2)
        assert stats["http.ingress_http.ext_proc.streams_started"] == 4
        assert stats.get("http.ingress_http.ext_proc.stream_msgs_received", 0) > 0
    finally:
        await proxy.stop(0)
        await a.stop(0)
        await b.stop(0)


# -- (b) a backend killed mid-stream, then restarted ---------------------------------------------

async def _spawn(name: str, port: int = 0) -> tuple[Any, int]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, os.path.join(HERE, "serve_echo.py"), name, str(port),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    found = re.match(r"PORT (\d+)", line)
    assert found, f"backend did not start: {line!r}"
    return process, int(found.group(1))


async def _kill(process: Any) -> None:
    if process.returncode is None:
        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


@pytest.fixture
async def spawned() -> AsyncIterator[list[Any]]:
    processes: list[Any] = []
    yield processes
    for process in processes:
        await _kill(process)


async def test_backend_killed_mid_stream_then_restarted(spawned: list[Any]) -> None:
    process, port = await _spawn("doomed")
    spawned.append(process)
    other = await EchoBackend("other").start()
    proxy = ProxyServer(parse_routes(f"""
        backends:
          plugins: {{targets: 127.0.0.1:{port}}}
          other: {{targets: {other.target}}}
        routes:
          - match: {{metadata: {{x-team: other}}}}
            backend: other
        default: plugins
        """), **SERVER)
    await proxy.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{proxy.plaintext_port}")
    echo = pb_grpc.EchoStub(channel)
    try:
        stream = echo.Bidi()
        await stream.write(pb.Ping(value="one"))
        assert (await stream.read()).backend == "doomed"
        other_stream = echo.Bidi(metadata=[("x-team", "other")])
        await other_stream.write(pb.Ping(value="o1"))
        assert (await other_stream.read()).backend == "other"

        await _kill(process)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stream.read()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # The proxy's own error names no address (the log does).
        assert info.value.details() == "backend unavailable"

        # the proxy keeps serving: the other stream and new calls elsewhere are fine
        await other_stream.write(pb.Ping(value="o2"))
        assert (await other_stream.read()).value == "o2"
        await other_stream.done_writing()
        assert await other_stream.read() is grpc.aio.EOF
        assert (await echo.Unary(pb.Ping(), metadata=[("x-team", "other")])).backend == "other"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await echo.Unary(pb.Ping())
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        process, _ = await _spawn("reborn", port)
        spawned.append(process)
        served = None
        for _ in range(200):  # the channel reconnects within its (short) backoff
            try:
                served = (await echo.Unary(pb.Ping(), timeout=5)).backend
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                await asyncio.sleep(0.1)
        assert served == "reborn"
    finally:
        await channel.close()
        await proxy.stop(0)
        await other.stop()


# -- (c) Tyk: one gateway, one proxy, a plugin server per team ---------------------------------

async def test_tyk_plugin_servers_per_api_behind_one_proxy() -> None:
    from calloutkit.tyk import EventHandler, GatewayEvent, Hook, Plugin, PluginCall, TykPluginServer
    from calloutkit.tyk.testing import Gateway, HttpRequest, event_payload

    def team_server(team: str) -> tuple[TykPluginServer, list[GatewayEvent], list[str]]:
        events: list[GatewayEvent] = []
        seen: list[str] = []

        async def tag(call: PluginCall) -> None:
            seen.append(call.api_id)
            call.request.set_header("X-Team", team)

        async def record(event: GatewayEvent) -> None:
            events.append(event)

        server = TykPluginServer(plugins=[Plugin("Tag", tag, hook=Hook.PRE)],
                                 events=[EventHandler(record)], **SERVER)
        return server, events, seen

    (team_a, events_a, seen_a), (team_b, events_b, seen_b), (fallback, events_f, seen_f) = (
        team_server("a"), team_server("b"), team_server("default"))
    for server in (team_a, team_b, fallback):
        await server.start()
    proxy = ProxyServer(parse_routes(f"""
        backends:
          team-a: {{targets: 127.0.0.1:{team_a.plaintext_port}}}
          team-b: {{targets: 127.0.0.1:{team_b.plaintext_port}}}
          shared: {{targets: 127.0.0.1:{fallback.plaintext_port}}}
        routes:
          - name: team-a
            match: {{tyk: {{api_id: [api-1, api-2]}}}}
            backend: team-a
          - name: team-b
            match: {{tyk: {{api_id: api-3}}}}
            backend: team-b
        default: shared
        """), **SERVER)
    await proxy.start()
    target = f"tcp://127.0.0.1:{proxy.plaintext_port}"  # as coprocess_grpc_server
    try:
        body = b'{"pets": ' + b"1" * 50_000 + b"}"
        for api_id, team in [("api-1", "a"), ("api-2", "a"), ("api-3", "b"),
                             ("api-9", "default")]:
            async with Gateway(target, api_id=api_id, org_id="org") as gateway:
                outcome = await gateway.request_hook(
                    Hook.PRE, "Tag", HttpRequest("POST", "/pets?x=1", body=body))
                assert outcome.error is None, outcome.error
                assert outcome.request.header("X-Team") == team
                returned = outcome.returned
                assert returned.spec["APIID"] == api_id and returned.spec["OrgID"] == "org"
                assert returned.request.raw_body == body  # the Object came back intact
                assert returned.request.url == "/pets?x=1"
                await gateway.dispatch_event(event_payload(
                    "AuthFailure", {"Path": "/pets"}, handler_name="audit", api_id=api_id))
        assert (seen_a, seen_b, seen_f) == (["api-1", "api-2"], ["api-3"], ["api-9"])
        assert [e.api_id for e in events_a] == ["api-1", "api-2"]
        assert [e.api_id for e in events_b] == ["api-3"]
        assert [(e.api_id, e.type, e.handler_name) for e in events_f] == [
            ("api-9", "AuthFailure", "audit")]
    finally:
        await proxy.stop(0)
        for server in (team_a, team_b, fallback):
            await server.stop(0)
