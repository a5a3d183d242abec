"""A rolling restart behind Envoy loses nothing: two `calloutkit serve --drain_delay` replicas,
the guide's Envoy config (health checks, outlier detection, retries), steady load, each replica
SIGTERMed and started again in turn."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port, read_until, spawn, stop_process

from calloutkit.testing import Envoy, UpstreamServer, http_request

pytestmark = pytest.mark.envoy

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide" / "envoy.md"
DRAIN_DELAY = "3"  # the guide's health check: every 1 s, unhealthy after 1; and a margin
LOAD_SECONDS = 10


def guide_config(replicas: list[int], app: int) -> dict[str, Any]:
    """The guide's complete Envoy config on free ports, its callout cluster on ``replicas``."""
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", GUIDE.read_text(), re.S)
                if "static_resources:" in b]
    config: dict[str, Any] = yaml.safe_load(block)
    config["admin"]["address"]["socket_address"]["port_value"] = 0
    for listener in config["static_resources"]["listeners"]:
        listener["address"]["socket_address"]["port_value"] = 0
    for cluster in config["static_resources"]["clusters"]:
        ports = replicas if cluster["name"] == "callout" else [app]
        cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": port}}}}
            for port in ports]}]
    return config


def start_replica(port: int) -> subprocess.Popen[str]:
    process = spawn([sys.executable, "-m", "calloutkit", "serve", "tests/servers/pid_server.py",
                     "--plaintext_address", f"127.0.0.1:{port}", "--combined_health_check",
                     "--disable_tls", "--drain_delay", DRAIN_DELAY, "--grace_period", "5"])
    read_until(process, "serving:")
    threading.Thread(target=drain_output, args=(process,), daemon=True).start()
    return process


def drain_output(process: subprocess.Popen[str]) -> None:
    """Keep reading the replica's log so that a full pipe never blocks it."""
    assert process.stdout is not None
    try:
        for _ in process.stdout:
            pass
    except (ValueError, OSError):  # closed by stop_process
        pass


def healthy_in_envoy(envoy: Envoy, port: int) -> bool:
    with urllib.request.urlopen(envoy.admin_url + "/clusters", timeout=2) as response:
        text = response.read().decode()
    flags = f"callout::127.0.0.1:{port}::health_flags::"
    return any(line.startswith(flags) and line.endswith("::healthy")
               for line in text.splitlines())


def wait_healthy(envoy: Envoy, port: int, timeout: float = 10) -> None:
    """As a rollout waits for a new replica to be ready before it stops the next one."""
    deadline = time.monotonic() + timeout
    while not healthy_in_envoy(envoy, port):
        assert time.monotonic() < deadline, f"replica on {port} never turned healthy in Envoy"
        time.sleep(0.05)


def test_rolling_restart_of_two_replicas_loses_no_request() -> None:
    ports = [free_port(), free_port()]
    replicas = {port: start_replica(port) for port in ports}
    pids = {process.pid for process in replicas.values()}
    try:
        with UpstreamServer() as upstream, Envoy(guide_config(ports, upstream.port)) as envoy:
            for port in ports:
                wait_healthy(envoy, port)
            results: list[tuple[int, str | None]] = []
            lock = threading.Lock()
            restarted = threading.Event()

            started = time.monotonic()

            def client() -> None:
                # ~200 requests a second from 4 clients, for 10 s and until the rollout is over.
                while len(results) < 4000 and not (
                        restarted.is_set() and time.monotonic() - started > LOAD_SECONDS):
                    response = http_request(envoy.url + "/", "POST", [("x-test", "1")],
                                            "payload", timeout=10)
                    pid = (json.loads(response.body)["headers"].get("x-worker-pid")
                           if 200 <= response.status < 300 else None)
                    with lock:
                        results.append((response.status, pid))
                    time.sleep(0.015)

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                clients = [pool.submit(client) for _ in range(4)]
                try:
                    time.sleep(1)
                    for port in ports:
                        old = replicas[port]
                        os.kill(old.pid, signal.SIGTERM)
                        assert old.wait(15) == 0
                        stop_process(old)  # closes its pipe
                        replicas[port] = start_replica(port)
                        pids.add(replicas[port].pid)
                        wait_healthy(envoy, port)
                        time.sleep(0.5)
                finally:
                    restarted.set()
                for done in clients:
                    done.result()
            failed = [status for status, _ in results if not 200 <= status < 300]
            assert len(results) > 1000
            assert failed == [], f"{len(failed)} of {len(results)} failed: {failed[:10]}"
            assert all(pid is not None and int(pid) in pids for _, pid in results)
            # Both the old and the new replicas answered.
            assert len({pid for _, pid in results}) == 4
            # Envoy's health check saw each replica stop before it refused a stream, so no
            # stream needed the retry policy (it is the safety net, not the mechanism).
            stats = envoy.stats()
            assert stats.get("cluster.callout.upstream_rq_retry", 0) == 0, stats
            assert stats.get("cluster.callout.outlier_detection.ejections_enforced_total",
                             0) == 0
    finally:
        for process in replicas.values():
            stop_process(process)
