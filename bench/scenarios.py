"""What each benchmark section sets up, checks and measures.

Every section has one shape: ``start()`` brings up one target per variant (a server, and an
Envoy or a proxy in front of it where the section says so) and checks with a real request that
the target does the work; ``measure(label)`` runs one timed load against one target and
returns its figures; ``stop()`` tears everything down. `run.py` interleaves the ``measure``
calls, so that a noisy neighbour hurts every variant alike.
"""

from __future__ import annotations

import dataclasses
import http.client
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from load import HERE, Proxy, Server, Tree, grpc_frame, h2load, wrk

from calloutkit.testing._envoy import Envoy, envoy_config
from calloutkit.tyk.testing import HttpRequest, request_object

BODY_SIZE = 16 * 1024
BODY = (b"calloutkit benchmark body. " * (BODY_SIZE // 27 + 1))[:BODY_SIZE]
EXT_PROC_PATH = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
DISPATCH_PATH = "/coprocess.Dispatcher/Dispatch"

Figures = dict[str, float]


@dataclasses.dataclass(frozen=True)
class Goal:
    """A target for one variant: its figure ``key`` (of `Section.measure`) must be at most (or
    at least) ``bound``; with ``of_reference``, the figure divided by the section's reference
    measured around it (paired sections) or in the same round (unpaired ones)."""

    key: str
    bound: float
    at_most: bool = True
    of_reference: bool = True

    def text(self) -> str:
        name = {"rate": "rate", "cpu_us": "CPU/op", "p99_ms": "p99",
                "kb_per_stream": "KiB/stream"}.get(self.key, self.key)
        return (f"{name} {'x ref ' if self.of_reference else ''}"
                f"{'<=' if self.at_most else '>='} {self.bound:g}")

    def met(self, value: float) -> bool:
        return value <= self.bound if self.at_most else value >= self.bound


@dataclasses.dataclass(frozen=True)
class Variant:
    """One side of a comparison: ``impl`` of `servers.py` (None: no callout at all).

    ``transport`` None leaves calloutkit's transport to ``CALLOUTKIT_TRANSPORT`` (the floor
    ignores it); ``goals`` are the targets the report checks this variant against."""

    label: str
    impl: str | None
    workers: int = 1
    loop: str = "uvloop"
    via_proxy: bool = False
    transport: str | None = None
    goals: tuple[Goal, ...] = ()


@dataclasses.dataclass
class Target:
    variant: Variant
    server: Server | None = None
    envoy: Envoy | None = None
    proxy: Proxy | None = None

    @property
    def port(self) -> int:
        if self.proxy is not None:
            return self.proxy.port
        assert self.server is not None
        return self.server.port

    def trees(self) -> list[Tree]:
        """The callout side's processes: the server (every worker) and any proxy."""
        out = [self.server.tree] if self.server is not None else []
        return out + ([self.proxy.tree] if self.proxy is not None else [])

    def cpu(self) -> float:
        return sum(tree.cpu() for tree in self.trees())

    def peak_rss_mb(self) -> float:
        return sum(tree.peak_rss_mb() for tree in self.trees())

    def stop(self) -> None:
        for part in (self.envoy, self.proxy, self.server):
            if part is not None:
                part.stop()


class Section:
    """The shared part: one target per variant, started up front, stopped at the end."""

    name = ""
    unit = ""
    title = ""
    work = ""  # the WORK argument of servers.py
    paired = True  # measure the reference around every measurement (see run.run_section)

    def __init__(self, variants: list[Variant], reference: str) -> None:
        self.variants = variants
        self.reference = reference  # the label ratios are taken against
        self.targets: dict[str, Target] = {}

    def start(self) -> None:
        for variant in self.variants:
            target = Target(variant)
            self.targets[variant.label] = target
            if variant.impl is not None:
                target.server = Server(variant.impl, self.work, workers=variant.workers,
                                       loop=variant.loop, transport=variant.transport).ready()
            self.prepare(target)

    def prepare(self, target: Target) -> None:
        """Put what the section needs in front of the server, check it, warm it up."""

    def measure(self, label: str) -> Figures:
        raise NotImplementedError

    def stop(self) -> None:
        for target in self.targets.values():
            target.stop()


# -- through Envoy ---

def envoy_bench_config(callout_port: int | None, work: str) -> dict[str, Any]:
    """Envoy -> ext_proc -> a direct_response route, so that no upstream process costs CPU.

    The route copies the request header the callout set into the response as
    ``x-seen-request``: that is how the check sees the request-side mutation arrive.
    """
    if work == "headers":
        mode = {"request_header_mode": "SEND", "response_header_mode": "SEND"}
        body = "ok"
    else:
        mode = {"request_header_mode": "SKIP", "response_header_mode": "SEND",
                "response_body_mode": "BUFFERED"}
        body = BODY.decode()
    config = envoy_config(callout_port or 1, 1, processing_mode=mode, access_log=False,
                          message_timeout="5s")
    resources = config["static_resources"]
    hcm = resources["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["max_direct_response_body_size_bytes"] = BODY_SIZE * 2
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [{
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": body}},
        "response_headers_to_add": [{"header": {
            "key": "x-seen-request", "value": "%REQ(x-callout-request)%"}}]}]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] != "upstream"]
    if callout_port is None:
        hcm["http_filters"] = [f for f in hcm["http_filters"]
                               if f["name"] != "envoy.filters.http.ext_proc"]
        resources["clusters"] = []
    else:
        # Envoy multiplexes all ext_proc streams of a worker thread on one HTTP/2 connection
        # unless a stream limit makes it open more; the kernel spreads connections, not
        # streams, over the processes of a multi-worker callout. Same setting for all sides.
        options = next(iter(resources["clusters"][0]["typed_extension_protocol_options"]
                            .values()))
        options["explicit_http_config"]["http2_protocol_options"] = {"max_concurrent_streams": 8}
    return config


def _get(port: int) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


class EnvoySection(Section):
    """HTTP/1.1 load from wrk through a real Envoy 1.40 (one worker thread)."""

    unit = "req/s"

    def __init__(self, work: str, variants: list[Variant], reference: str, seconds: int,
                 connections: int) -> None:
        super().__init__(variants, reference)
        self.work, self.seconds, self.connections = work, seconds, connections
        self.name = f"envoy-{work}"
        self.title = (f"Envoy, header mutation both ways, wrk {connections} connections"
                      if work == "headers" else
                      f"Envoy, BUFFERED 16 KB response body replaced, wrk {connections} "
                      "connections")

    def prepare(self, target: Target) -> None:
        target.envoy = Envoy(envoy_bench_config(
            target.server.port if target.server else None, self.work)).start()
        status, headers, body = _get(target.envoy.port)
        called = target.server is not None
        want = (BODY.upper() if called else BODY) if self.work == "body" else b"ok"
        mutated = not called or self.work == "body" or (
            headers.get("x-seen-request") == "1" and headers.get("x-callout-response") == "1")
        if status != 200 or body != want or not mutated:
            raise SystemExit(f"{self.name} / {target.variant.label}: wrong answer {status} "
                             f"{headers} {body[:60]!r}")
        wrk(target.envoy.url + "/", 1, self.connections)  # warm up

    def measure(self, label: str) -> Figures:
        target = self.targets[label]
        assert target.envoy is not None and target.envoy.process is not None
        envoy = Tree(target.envoy.process.pid)
        cpu, envoy_cpu = target.cpu(), envoy.cpu()
        result = wrk(target.envoy.url + "/", self.seconds, self.connections)
        cpu, envoy_cpu = target.cpu() - cpu, envoy.cpu() - envoy_cpu
        if result.errors:
            raise SystemExit(f"{self.name} / {label}: {result.errors} requests failed")
        return {"rate": result.rate, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
                "p999_ms": result.p999_ms, "cpu_us": cpu / result.requests * 1e6,
                "envoy_cpu_us": envoy_cpu / result.requests * 1e6,
                "peak_rss_mb": target.peak_rss_mb()}


# -- straight at the server ---

def ext_proc_message(index: int = 0) -> pb.ProcessingRequest:
    """Request headers like the ones Envoy sends for a small GET."""
    request = pb.ProcessingRequest()
    headers = request.request_headers.headers.headers
    for key, value in ((":method", "GET"), (":path", f"/items/{index}"),
                       (":authority", "bench.local"), (":scheme", "http"),
                       ("user-agent", "calloutkit-bench"), ("x-request-id", f"{index:032x}")):
        header = headers.add()
        header.key, header.raw_value = key, value.encode()
    request.request_headers.end_of_stream = True
    return request


def tyk_object() -> Any:
    """The Object a gateway sends for a Pre hook on a small GET."""
    return request_object("pre", "AddHeader", HttpRequest(
        "GET", "/petstore/pets?limit=2", headers=[("Accept", "application/json"),
                                                  ("User-Agent", "calloutkit-bench")]),
        api_id="petstore", org_id="bench")


def _ext_proc_ok(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(EXT_PROC_PATH,
                                     request_serializer=pb.ProcessingRequest.SerializeToString,
                                     response_deserializer=pb.ProcessingResponse.FromString)
        reply = next(iter(call(iter([ext_proc_message()]), timeout=10)))
    headers = reply.request_headers.response.header_mutation.set_headers
    return len(headers) >= 1 and headers[0].header.raw_value == b"1"


def _dispatch_ok(port: int) -> bool:
    obj = tyk_object()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = channel.unary_unary(DISPATCH_PATH, request_serializer=type(obj).SerializeToString,
                                    response_deserializer=type(obj).FromString)(obj, timeout=10)
    return reply.request.set_headers.get("X-Plugin") in ("floor", "calloutkit")


class GrpcSection(Section):
    """gRPC load from h2load straight at the server (through the proxy where asked)."""

    def __init__(self, name: str, title: str, work: str, variants: list[Variant],
                 reference: str, *, body: bytes, path: str, check: Callable[[int], bool],
                 streams: int, connections: int, concurrent: int,
                 messages_per_stream: int = 1, unit: str = "streams/s") -> None:
        super().__init__(variants, reference)
        self.name, self.title, self.work, self.unit = name, title, work, unit
        self.body, self.path, self.check = body, path, check
        self.streams, self.connections, self.concurrent = streams, connections, concurrent
        self.messages_per_stream = messages_per_stream

    def prepare(self, target: Target) -> None:
        if target.variant.via_proxy:
            assert target.server is not None
            target.proxy = Proxy(f"backends:\n  plugins: {{targets: 127.0.0.1:"
                                 f"{target.server.port}}}\ndefault: plugins\n")
        if not self.check(target.port):
            raise SystemExit(f"{self.name} / {target.variant.label}: wrong answer")
        self._load(target, max(self.connections, self.streams // 10))  # warm up

    def _load(self, target: Target, streams: int) -> Any:
        return h2load(target.port, self.path, self.body, streams=streams,
                      connections=self.connections, concurrent=self.concurrent)

    def measure(self, label: str) -> Figures:
        target = self.targets[label]
        cpu = target.cpu()
        result = self._load(target, self.streams)
        cpu = target.cpu() - cpu
        if result.failed:
            raise SystemExit(f"{self.name} / {label}: {result.failed} streams failed")
        operations = result.streams * self.messages_per_stream
        return {"rate": operations / result.seconds, "cpu_us": cpu / operations * 1e6,
                "peak_rss_mb": target.peak_rss_mb()}


def streams_section(variants: list[Variant], reference: str, streams: int) -> GrpcSection:
    return GrpcSection(
        "grpc-streams", "ext_proc straight at the server: one-message streams, h2load "
        "16 connections x 4 streams", "headers", variants, reference,
        body=grpc_frame(ext_proc_message()), path=EXT_PROC_PATH, check=_ext_proc_ok,
        streams=streams, connections=16, concurrent=4)


def workers_section(variants: list[Variant], reference: str, streams: int,
                    milliseconds: int) -> GrpcSection:
    """1 worker against 2 on a CPU-bound callback: ``heavy`` (~1 ms) or ``heavier`` (~3 ms)."""
    work = {1: "heavy", 3: "heavier"}[milliseconds]
    return GrpcSection(
        f"grpc-workers-{milliseconds}ms", f"ext_proc straight at the server, a callback with "
        f"~{milliseconds} ms of Python work: 1 worker against 2, h2load 64 connections x 1 "
        "stream", work, variants, reference, body=grpc_frame(ext_proc_message()),
        path=EXT_PROC_PATH, check=_ext_proc_ok, streams=streams, connections=64, concurrent=1)


# Each process imports the work, says so, waits for the word, then repeats the work for a
# fixed time and prints how often it did: all processes of a measurement start together.
_SPIN = """
import sys, time
sys.path.insert(0, sys.argv[1])
from servers import heavy_work
print("ready", flush=True)
sys.stdin.readline()
end, count, cpu = time.monotonic() + float(sys.argv[2]), 0, time.process_time()
while time.monotonic() < end:
    heavy_work()
    count += 1
print(count, time.process_time() - cpu, flush=True)
"""


class CeilingSection(Section):
    """The workers' ceiling on this machine: the heavy callback's own Python, without gRPC, in
    N processes at once (``Variant.workers``), as work done per second."""

    name = "cpu-ceiling"
    unit = "callbacks/s"

    def __init__(self, variants: list[Variant], reference: str, seconds: float) -> None:
        super().__init__(variants, reference)
        self.seconds = seconds
        self.title = ("the machine's ceiling for workers: the ~1 ms callback's Python alone "
                      "(no gRPC), N processes at once")

    def measure(self, label: str) -> Figures:
        processes = self.targets[label].variant.workers
        spinning = [subprocess.Popen([sys.executable, "-c", _SPIN, HERE, str(self.seconds)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                    for _ in range(processes)]
        for child in spinning:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        for child in spinning:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        reports = [child.communicate(timeout=self.seconds + 30)[0].split()
                   for child in spinning]
        done = sum(int(count) for count, _ in reports)
        cpu = sum(float(seconds) for _, seconds in reports)
        return {"rate": done / self.seconds, "cpu_us": cpu / done * 1e6}


def long_stream_section(variants: list[Variant], reference: str,
                        messages: int) -> GrpcSection:
    return GrpcSection(
        "grpc-one-stream", f"ext_proc straight at the server: {messages:,} messages on one "
        "stream, pipelined", "headers", variants, reference,
        body=b"".join(grpc_frame(ext_proc_message(i)) for i in range(messages)),
        path=EXT_PROC_PATH, check=_ext_proc_ok, streams=1, connections=1, concurrent=1,
        messages_per_stream=messages, unit="msgs/s")


def tyk_section(variants: list[Variant], reference: str, calls: int) -> GrpcSection:
    return GrpcSection(
        "tyk-dispatch", "Tyk Dispatch (Pre hook adds a header), h2load 4 connections x 16 calls",
        "tyk", variants, reference, body=grpc_frame(tyk_object()), path=DISPATCH_PATH,
        check=_dispatch_ok, streams=calls, connections=4, concurrent=16, unit="calls/s")


# -- idle streams ---

class IdleSection(Section):
    """Memory per held-open idle stream, and proof that every held stream still answers."""

    name = "idle-streams"
    unit = "streams"
    work = "headers"
    paired = False  # memory does not drift with the machine's speed

    def __init__(self, variants: list[Variant], reference: str, streams: int) -> None:
        super().__init__(variants, reference)
        self.streams = streams
        self.title = f"{streams:,} idle ext_proc streams held open"

    def prepare(self, target: Target) -> None:
        assert target.server is not None
        if not _ext_proc_ok(target.server.port):
            raise SystemExit(f"{self.name} / {target.variant.label}: wrong answer")
        h2load(target.server.port, EXT_PROC_PATH, grpc_frame(ext_proc_message()),
               streams=2000, connections=4, concurrent=16)  # warm every code path

    def measure(self, label: str) -> Figures:
        target = self.targets[label]
        assert target.server is not None
        tree = target.server.tree
        time.sleep(0.5)
        before = tree.rss_kb()
        client = subprocess.Popen(
            [sys.executable, f"{HERE}/idle_streams.py", str(target.server.port),
             str(self.streams)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert client.stdin is not None and client.stdout is not None
        started = time.monotonic()
        held = client.stdout.readline().split()
        opened_in = time.monotonic() - started
        if held[:1] != ["HELD"]:
            client.kill()
            raise SystemExit(f"{self.name} / {label}: the client failed: {held}")
        time.sleep(1.0)
        during = tree.rss_kb()
        client.stdin.write("go\n")
        client.stdin.flush()
        answered = client.stdout.readline().split()
        client.wait(120)
        return {"held": float(held[1]), "answered": float(answered[1]),
                "unanswered": self.streams - float(answered[1]),
                "kb_per_stream": (during - before) / self.streams,
                "rss_before_mb": before / 1024, "rss_held_mb": during / 1024,
                "open_seconds": opened_in}


# -- memory over many requests ---

class RssSection(Section):
    """A fresh server per measurement: its RSS after ``first`` one-message streams and after
    ``total``, and the growth between (the figure a leak per stream shows in)."""

    name = "rss-growth"
    unit = "MiB"
    work = "headers"
    paired = False  # memory does not drift with the machine's speed

    def __init__(self, variants: list[Variant], reference: str, first: int, total: int) -> None:
        super().__init__(variants, reference)
        self.first, self.total = first, total
        self.title = (f"server RSS after {first:,} and after {total:,} one-message ext_proc "
                      "streams (h2load 16 connections x 4 streams), a fresh server each time")

    def start(self) -> None:
        self.targets = {v.label: Target(v) for v in self.variants}

    def measure(self, label: str) -> Figures:
        variant = self.targets[label].variant
        assert variant.impl is not None
        server = Server(variant.impl, self.work, workers=variant.workers, loop=variant.loop,
                        transport=variant.transport).ready()
        try:
            if not _ext_proc_ok(server.port):
                raise SystemExit(f"{self.name} / {label}: wrong answer")
            frame = grpc_frame(ext_proc_message())
            rss = []
            for streams in (self.first, self.total - self.first):
                result = h2load(server.port, EXT_PROC_PATH, frame, streams=streams,
                                connections=16, concurrent=4)
                if result.failed:
                    raise SystemExit(f"{self.name} / {label}: {result.failed} streams failed")
                time.sleep(0.5)
                rss.append(server.tree.rss_kb() / 1024)
        finally:
            server.stop()
        return {"rss_first_mb": rss[0], "rss_total_mb": rss[1], "growth_mb": rss[1] - rss[0]}
