"""The native transport behind a real Envoy: one gateway's load spreads over connections
(SETTINGS_MAX_CONCURRENT_STREAMS) and, with workers, over processes (connection ageing)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest
from conftest import free_port, spawn, stop_process

from calloutkit.testing import Envoy, UpstreamServer, envoy_config

pytestmark = pytest.mark.envoy


@dataclass
class Load:
    """What many keep-alive HTTP/1.1 clients saw through Envoy."""
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)


async def _client(port: int, load: Load, stop_at: float, stop: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        n = 0
        while time.monotonic() < stop_at and not stop.is_set():
            n += 1
            writer.write(f"GET /n/{n} HTTP/1.1\r\nhost: test\r\n\r\n".encode())
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(head[0].split()[1])
            headers = dict(line.lower().split(": ", 1) for line in head[1:] if line)
            await reader.readexactly(int(headers.get("content-length", "0")))
            if status != 200:
                load.failed.append(head[0])
            elif "x-worker-pid" not in headers:
                load.failed.append("no x-worker-pid")
            else:
                load.ok += 1
                load.pids.add(int(headers["x-worker-pid"]))
    finally:
        writer.close()


async def drive(port: int, clients: int, seconds: float, until_pids: int = 0) -> Load:
    """``clients`` concurrent clients for ``seconds`` (or until that many pids answered)."""
    load, stop = Load(), asyncio.Event()
    stop_at = time.monotonic() + seconds

    async def watch() -> None:
        while until_pids and len(load.pids) < until_pids:
            await asyncio.sleep(0.05)
        if until_pids:
            stop.set()

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(_client(port, load, stop_at, stop) for _ in range(clients)))
    watcher.cancel()
    return load


def start_callout(port: int, *extra: str, hold: float) -> tuple[subprocess.Popen[str], list[int]]:
    process = spawn([sys.executable, "-m", "calloutkit", "serve",
                     "tests/servers/aged_pid_server.py", "--plaintext_address",
                     f"127.0.0.1:{port}", "--combined_health_check", "--disable_tls",
                     "--transport", "native", *extra],
                    env={**os.environ, "HOLD_SECONDS": str(hold)})
    # The supervisor's line and the workers' may come in any order.
    workers: list[int] = []
    serving, wanted = 0, 2 if "--workers" in extra else 1
    assert process.stdout is not None
    for _ in range(200):
        line = process.stdout.readline()
        if "supervisor" in line:
            workers = [int(pid) for pid in line.rsplit("[", 1)[1].rstrip("]\n").split(", ")]
        serving += "serving:" in line
        if not line or (serving == wanted and (workers or wanted == 1)):
            break
    assert serving == wanted, "the callout never served"
    return process, workers


def test_one_envoys_load_reaches_every_worker_with_no_error_across_ageing():
    port = free_port()
    process, workers = start_callout(port, "--workers", "2", hold=0.005)
    try:
        with UpstreamServer() as upstream, \
                Envoy(envoy_config(port, upstream.port, access_log=False)) as envoy:
            # Fewer streams in flight than a connection allows: Envoy needs one connection,
            # and only its ageing (every ~1 s here) can take the load to the other worker.
            load = asyncio.run(drive(envoy.port, 16, 20, until_pids=2))
            # Go on a little: more ageing GOAWAYs under load, each must cost no request.
            more = asyncio.run(drive(envoy.port, 16, 3))
            stats = envoy.stats()
        assert load.failed == [] and more.failed == []
        assert load.pids == set(workers)
        assert stats["cluster.callout.upstream_cx_total"] >= 3  # aged out at least twice
        assert stats["cluster.callout.upstream_cx_close_notify"] >= 2  # by GOAWAY
        assert stats.get("cluster.callout.upstream_cx_destroy_with_active_rq", 0) == 0
        assert stats.get("cluster.callout.upstream_rq_rx_reset", 0) == 0
        assert stats["http.ingress_http.ext_proc.streams_started"] == load.ok + more.ok
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        stop_process(process)


def test_envoy_spreads_streams_over_connections_at_its_cluster_limit_without_an_error():
    # One process, no ageing: several connections come from the stream limit alone. It is
    # Envoy's own (the cluster's max_concurrent_streams), which applies from the first
    # stream; the server's SETTINGS come a round trip late, and a lower server limit refused
    # what Envoy queued for a new connection before then (see `_NATIVE_MAX_STREAMS`).
    port = free_port()
    process, _ = start_callout(port, hold=0.1)
    try:
        with UpstreamServer() as upstream:
            config = envoy_config(port, upstream.port, access_log=False)
            cluster = config["static_resources"]["clusters"][0]
            http2 = next(iter(cluster["typed_extension_protocol_options"].values()))
            http2["explicit_http_config"]["http2_protocol_options"]["max_concurrent_streams"] = 100
            with Envoy(config) as envoy:
                load = asyncio.run(drive(envoy.port, 250, 3))
                stats = envoy.stats()
        assert load.failed == [] and load.ok > 250
        # 250 requests in flight over connections of 100 streams: at least three.
        assert stats["cluster.callout.upstream_cx_total"] >= 3
        assert stats.get("cluster.callout.upstream_cx_close_notify", 0) == 0
        assert stats.get("cluster.callout.upstream_rq_rx_reset", 0) == 0
    finally:
        stop_process(process)
