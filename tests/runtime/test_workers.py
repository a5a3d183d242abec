"""--workers: processes share the ports, a dead worker comes back, signals drain them all."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

import grpc
import pytest
from conftest import alive, free_port, read_all, read_until, run_cli, spawn, stop_process
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from calloutkit import ConfigError, ServerConfig
from calloutkit.testing import http_headers

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


def answering_pid(port: int) -> int:
    """Open a fresh connection, send request headers, return the pid that answered."""
    with grpc.insecure_channel(f"127.0.0.1:{port}",
                               options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        call = channel.stream_stream(METHOD,
                                     request_serializer=pb.ProcessingRequest.SerializeToString,
                                     response_deserializer=pb.ProcessingResponse.FromString)
        request = pb.ProcessingRequest(request_headers=http_headers({":path": "/"}, True))
        reply = next(iter(call(iter([request]), timeout=10)))
        header = reply.request_headers.response.header_mutation.set_headers[0].header
        return int(header.raw_value)


def test_workers_share_the_port_and_are_restarted():
    port = free_port()
    process = spawn([sys.executable, "-m", "calloutkit", "serve",
                     "tests/servers/pid_server.py", "--plaintext_address", f"127.0.0.1:{port}",
                     "--combined_health_check", "--disable_tls", "--workers", "2"])
    try:
        read_all(process, {"supervisor": 1, "serving:": 2})
        pids = {answering_pid(port) for _ in range(40)}
        assert len(pids) == 2 and process.pid not in pids
        os.kill(process.pid, signal.SIGHUP)  # passed on; a server without reload ignores it
        assert {answering_pid(port) for _ in range(40)} == pids
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        read_until(process, "restarting it")
        read_until(process, "serving:")
        deadline = time.monotonic() + 20
        seen: set[int] = set()
        while time.monotonic() < deadline and len(seen - {victim}) < 2:
            seen.add(answering_pid(port))
        assert len(seen - {victim}) == 2 and victim not in seen
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        stop_process(process)


def test_workers_need_fixed_ports():
    with pytest.raises(ConfigError, match="fixed ports"):
        ServerConfig.build(plaintext_address=("127.0.0.1", 0), disable_tls=True,
                           combined_health_check=True, workers=2)


def test_workers_die_with_a_killed_supervisor():
    port = free_port()
    process = spawn([sys.executable, "-m", "calloutkit", "serve",
                     "tests/servers/pid_server.py", "--plaintext_address", f"127.0.0.1:{port}",
                     "--combined_health_check", "--disable_tls", "--workers", "2"])
    workers: list[int] = []
    try:
        (line,) = read_all(process, {"supervisor": 1, "serving:": 2})["supervisor"]
        workers = [int(pid) for pid in line.rsplit("[", 1)[1].rstrip("]\n").split(", ")]
        assert {answering_pid(port) for _ in range(40)} == set(workers)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and any(alive(pid) for pid in workers):
            time.sleep(0.05)
        assert [pid for pid in workers if alive(pid)] == []
    finally:
        stop_process(process)
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_workers_refuse_a_port_an_earlier_generation_holds():
    # A listener with SO_REUSEPORT is what a stale worker looks like to the kernel: new
    # workers would join it and share its connections.
    with socket.socket() as stale:
        stale.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        stale.bind(("127.0.0.1", 0))
        stale.listen()
        port = stale.getsockname()[1]
        result = run_cli("serve", "tests/servers/pid_server.py", "--plaintext_address",
                         f"127.0.0.1:{port}", "--combined_health_check", "--disable_tls",
                         "--workers", "2", timeout=30)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (f"calloutkit: error: cannot bind plaintext listener 127.0.0.1:{port}: "
                         "Address already in use (workers of an earlier run still serving?)")
    assert "Traceback" not in result.stderr and "supervisor" not in result.stderr
