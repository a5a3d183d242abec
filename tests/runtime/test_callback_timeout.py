"""callback_timeout behind a real Envoy: a def callback that never returns costs one thread,
not the replica; health says NOT_SERVING only when no callback thread is left."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from typing import Any

import grpc
import pytest
from conftest import LOOPBACK, running
from envoy.service.network_ext_proc.v3 import network_external_processor_pb2 as npb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from calloutkit import AuthzServer, CalloutServer, NetworkCalloutServer, add_header_mutation
from calloutkit.testing import (
    AuthzClient,
    Envoy,
    HttpResponse,
    NetworkCalloutClient,
    UpstreamServer,
    envoy_config,
    http_request,
)
from calloutkit.tyk import Hook, Object, Plugin, PluginCall, TykPluginServer

THREADS = 4  # the pool; it replaces as many stuck threads, so 2 * THREADS can be stuck
TIMEOUT = 0.5


class Stuck(CalloutServer):
    """A plain def callback (so it runs in the pool) that blocks for ever on ``/stuck``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.release = threading.Event()  # set by the test at the end, so the threads exit

    def on_request_headers(self, headers, context):
        path = next(h.raw_value for h in headers.headers.headers if h.key == ":path")
        if path.startswith(b"/stuck"):
            self.release.wait()
        return add_header_mutation(add=[("x-seen", "1")])


def seen_by_upstream(response: HttpResponse) -> str | None:
    """The x-seen header the callout added, as the echoing upstream saw it."""
    if response.status != 200:
        return None
    return json.loads(response.body)["headers"].get("x-seen")  # type: ignore[no-any-return]


def normal_load(url: str, *, at_least: int, until: threading.Event | None = None,
                clients: int = 2) -> list[tuple[int, str | None, float]]:
    """``clients`` threads sending requests one after another: at least ``at_least`` of them
    in all, and on until ``until`` is set. Each is (status, x-seen, seconds)."""
    results: list[tuple[int, str | None, float]] = []
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if len(results) >= at_least and (until is None or until.is_set()):
                    return
            started = time.perf_counter()
            response = http_request(url + "/normal", timeout=10)
            with lock:
                results.append((response.status, seen_by_upstream(response),
                                time.perf_counter() - started))

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for done in [pool.submit(client) for _ in range(clients)]:
            done.result()
    return results


def p99(results: list[tuple[int, str | None, float]]) -> float:
    times = sorted(seconds for _, _, seconds in results)
    return times[int(len(times) * 0.99) - 1]


def all_served(results: list[tuple[int, str | None, float]]) -> bool:
    return all(status == 200 and seen == "1" for status, seen, _ in results)


def stuck_request(url: str) -> tuple[int, bytes]:
    response = http_request(url + "/stuck", timeout=10)
    return response.status, response.body


async def health(server: CalloutServer) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5)
        return int(reply.status)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.envoy
async def test_callbacks_stuck_for_ever_do_not_take_the_replica_down(
        upstream: UpstreamServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="calloutkit")
    server = Stuck(**LOOPBACK, server_thread_count=THREADS, callback_timeout=TIMEOUT)
    async with running(server):
        try:
            with Envoy(envoy_config(server.plaintext_port or 0, upstream.port)) as envoy:
                await asyncio.to_thread(normal_load, envoy.url, at_least=20)  # warm up
                before = await asyncio.to_thread(normal_load, envoy.url, at_least=300)
                assert all_served(before)

                # As many stuck requests as the pool has threads, one after another, while
                # the normal load goes on beside them.
                stuck_done = threading.Event()

                def send_stuck() -> list[tuple[int, bytes]]:
                    try:
                        return [stuck_request(envoy.url) for _ in range(THREADS)]
                    finally:
                        stuck_done.set()

                during, stuck = await asyncio.gather(
                    asyncio.to_thread(normal_load, envoy.url, at_least=100, until=stuck_done),
                    asyncio.to_thread(send_stuck))
                # Each stuck stream got the error policy's reply (fail closed: a 500).
                assert stuck == [(500, b"internal error in callout\n")] * THREADS
                assert all_served(during), [r for r in during if r[0] != 200][:5]
                assert p99(during) <= 3 * max(p99(before), 0.005), (p99(before), p99(during))
                assert server._pool.stuck == THREADS
                assert "Stuck.on_request_headers still running after callback_timeout" in (
                    caplog.text)

                after = await asyncio.to_thread(normal_load, envoy.url, at_least=100)
                assert all_served(after)
                assert await health(server) == SERVING

                # Past the replacement bound the pool shrinks, and health holds until the
                # last thread is stuck.
                for n in range(THREADS + 1, 2 * THREADS + 1):
                    assert await asyncio.to_thread(stuck_request, envoy.url) == (
                        500, b"internal error in callout\n")
                    if n < 2 * THREADS:
                        assert await health(server) == SERVING
                        assert all_served(await asyncio.to_thread(
                            normal_load, envoy.url, at_least=4))
                assert await health(server) == NOT_SERVING
                # Nothing can run now: a request still gets the policy's answer, in time.
                assert (await asyncio.to_thread(http_request, envoy.url + "/normal")).status \
                    == 500

                server.release.set()  # the stuck callbacks return
                deadline = time.monotonic() + 5
                while await health(server) != SERVING and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert await health(server) == SERVING
                assert server._pool.stuck == 0
                assert all_served(await asyncio.to_thread(normal_load, envoy.url,
                                                          at_least=20))
        finally:
            server.release.set()


# -- every protocol: the policy's reply, through the same pool ----------------------------------

class StuckAuthz(AuthzServer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.release = threading.Event()

    def on_check(self, request, context):
        self.release.wait()


class StuckNetwork(NetworkCalloutServer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.release = threading.Event()

    def on_read_data(self, data, end_of_stream, context):
        self.release.wait()


async def test_a_stuck_authz_check_is_denied_by_the_policy() -> None:
    server = StuckAuthz(**LOOPBACK, callback_timeout=0.2)
    try:
        reply = await asyncio.wait_for(AuthzClient(server).check(), 5)
        assert reply.denied_response.status.code == 403
        assert server._pool.stuck == 1
    finally:
        server.release.set()


async def test_a_stuck_l4_callback_closes_the_connection_by_the_policy() -> None:
    server = StuckNetwork(**LOOPBACK, callback_timeout=0.2)
    try:
        async with NetworkCalloutClient(server).stream() as connection:
            reply = await asyncio.wait_for(connection.read(b"hello"), 5)
        assert reply.connection_status == npb.ProcessingResponse.CLOSE
    finally:
        server.release.set()


async def test_a_stuck_tyk_plugin_is_answered_by_the_policy() -> None:
    release = threading.Event()

    def stuck(call: PluginCall) -> None:
        release.wait()

    server = TykPluginServer(plugins=[Plugin("stuck", stuck)], **LOOPBACK, callback_timeout=0.2)
    try:
        request = Object(hook_type=Hook.PRE, hook_name="stuck")
        request.request.url = "/"
        reply = Object.FromString(await asyncio.wait_for(
            server.dispatch_bytes(request.SerializeToString()), 5))
        assert reply.request.return_overrides.response_code == 500
    finally:
        release.set()
