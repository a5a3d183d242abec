"""Processes, load generators and measurements for `run.py`.

Load comes from C programs from the system's packages, so that the generator is not what is
measured: ``wrk`` for HTTP/1.1 through Envoy, ``h2load`` (nghttp2) for gRPC straight at a
server. CPU time and peak RSS are read from ``/proc`` for a server's whole process tree
(supervisor and workers alike).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            kids = [int(p) for p in handle.read().split()]
    except OSError:
        return []
    return [k for kid in kids for k in (kid, *_children(kid))]


def _stat_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Tree:
    """Measurements over a process and its descendants."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def pids(self) -> list[int]:
        return [self.pid, *_children(self.pid)]

    def cpu(self) -> float:
        """CPU seconds (user + system) used so far by every live process of the tree."""
        return sum(_stat_cpu(pid) for pid in self.pids())

    def peak_rss_mb(self) -> float:
        """Sum of each process's peak resident set (VmHWM), in MiB."""
        return sum(_status_kb(pid, "VmHWM") for pid in self.pids()) / 1024

    def rss_kb(self) -> int:
        return sum(_status_kb(pid, "VmRSS") for pid in self.pids())


class Child:
    """A child process in its own session, logging to a file; stopped by its process group."""

    def __init__(self, args: list[str], folder: str) -> None:
        self.folder = folder
        self.log_path = os.path.join(folder, "output.log")
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self.tree = Tree(self.popen.pid)

    def output(self) -> str:
        with open(self.log_path, errors="replace") as handle:
            return handle.read()[-3000:]

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """Wait until the output matches ``pattern``; exit with the output if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path, errors="replace") as handle:
                found = re.search(pattern, handle.read())
            if found:
                return found
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        output = self.output()
        self.stop()
        raise SystemExit(f"{self.popen.args} did not print {pattern!r}:\n{output}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


class Server(Child):
    """A process of ``bench/servers.py`` on a free port."""

    def __init__(self, impl: str, work: str, *, workers: int = 1, loop: str = "asyncio",
                 transport: str | None = None, under: tuple[str, ...] = ()) -> None:
        """``under`` is a command line the server runs under (valgrind, for one);
        ``transport`` None leaves the choice to ``CALLOUTKIT_TRANSPORT``."""
        self.impl, self.work, self.workers = impl, work, workers
        self.port = free_port()
        chosen = ["--transport", transport] if transport else []
        super().__init__([*under, sys.executable, os.path.join(HERE, "servers.py"), impl, work,
                          str(self.port), "--workers", str(workers), "--loop", loop, *chosen],
                         tempfile.mkdtemp(prefix="calloutkit-bench-"))

    def ready(self, timeout: float = 30) -> Server:
        wait_for_port(self.port, timeout)
        if self.workers > 1:  # every worker must have bound before load starts
            deadline = time.monotonic() + 30
            while len(self.tree.pids()) < self.workers + 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
        return self


class Proxy(Child):
    """``calloutkit proxy`` started on a free port with the routing file ``routes``."""

    def __init__(self, routes: str) -> None:
        folder = tempfile.mkdtemp(prefix="calloutkit-bench-proxy-")
        config = os.path.join(folder, "routes.yaml")
        with open(config, "w") as handle:
            handle.write(routes)
        super().__init__([sys.executable, "-m", "calloutkit", "--log-level", "INFO",
                          "proxy", "--config", config, "--plaintext_address", "127.0.0.1:0",
                          "--disable_tls", "--combined_health_check"], folder)
        self.port = int(self.wait_for(r"serving: grpc 127\.0\.0\.1:(\d+)").group(1))


# -- wrk ---

_WRK_REPORT = os.path.join(HERE, "wrk_report.lua")


@dataclasses.dataclass
class HttpResult:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    p999_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise SystemExit(f"{tool} not found: install the Debian package {package} "
                         f"(make bench does)")
    return path


def wrk(url: str, seconds: float, connections: int) -> HttpResult:
    """Closed-loop HTTP/1.1 load from one wrk thread; latency percentiles from wrk itself."""
    out = subprocess.run(
        [need("wrk", "wrk"), "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
         "-s", _WRK_REPORT, url], capture_output=True, text=True, check=True).stdout
    found = re.search(r"^CALLOUTKIT (\{.*\})$", out, re.M)
    if found is None:
        raise SystemExit(f"wrk printed no report:\n{out}")
    data = json.loads(found.group(1))
    return HttpResult(requests=data["requests"], seconds=data["duration_us"] / 1e6,
                      errors=data["errors"], p50_ms=data["p50"] / 1000,
                      p99_ms=data["p99"] / 1000, p999_ms=data["p999"] / 1000)


# -- h2load and gRPC frames ---

def grpc_frame(message: Any) -> bytes:
    """One length-prefixed gRPC message (uncompressed)."""
    data = message.SerializeToString()
    return struct.pack(">BI", 0, len(data)) + data


@dataclasses.dataclass
class GrpcResult:
    streams: int
    seconds: float
    failed: int

    @property
    def rate(self) -> float:
        return self.streams / self.seconds


def h2load(port: int, path: str, body: bytes, *, streams: int, connections: int,
           concurrent: int, rate: int = 0) -> GrpcResult:
    """gRPC calls from one h2load thread: each stream POSTs ``body`` and reads to the end.

    h2load checks the HTTP status only; callers verify the gRPC answer beforehand.
    """
    with tempfile.NamedTemporaryFile(prefix="calloutkit-h2load-") as data:
        data.write(body)
        data.flush()
        out = subprocess.run(
            [need("h2load", "nghttp2-client"), "-t1", f"-c{connections}", f"-m{concurrent}",
             f"-n{streams}", *([f"--rps={rate // connections}"] if rate else []),
             "-d", data.name, "-H", "content-type: application/grpc",
             "-H", "te: trailers", f"http://127.0.0.1:{port}{path}"],
            capture_output=True, text=True, check=False).stdout
    finished = re.search(r"finished in ([\d.]+)(m?s)", out)
    done = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded", out)
    if finished is None or done is None:
        raise SystemExit(f"h2load printed no result:\n{out}")
    seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    succeeded = int(done.group(2))
    return GrpcResult(streams=succeeded, seconds=seconds, failed=int(done.group(1)) - succeeded)
