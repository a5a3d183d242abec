"""The benchmark compares like with like: the bare floor servicers and the calloutkit servers of
``bench/`` answer the same request with the same reply, over real gRPC.

(The suite itself needs wrk, h2load and a quiet machine; it is run by ``make bench``, not here.)
"""

from __future__ import annotations

import os
import sys

import grpc
import pytest
from conftest import REPO, free_port, spawn, stop_process
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from calloutkit.tyk import Object

BENCH = os.path.join(REPO, "bench")
sys.path.insert(0, BENCH)

from scenarios import (  # noqa: E402
    BODY,
    DISPATCH_PATH,
    EXT_PROC_PATH,
    Goal,
    Variant,
    ext_proc_message,
    tyk_object,
)


@pytest.fixture(scope="module")
def servers():
    """Every (impl, work) pair the tests compare, started at once, each on its own port."""
    pairs = [(impl, work) for work in ("headers", "body")
             for impl in ("floor", "floor-readwrite", "async", "inline", "sync")]
    pairs += [("floor", "tyk"), ("async", "tyk")]
    running = {}
    for impl, work in pairs:
        port = free_port()
        running[impl, work] = (spawn([sys.executable, os.path.join(BENCH, "servers.py"), impl,
                                      work, str(port)]), port)
    try:
        for process, port in running.values():
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                grpc.channel_ready_future(channel).result(timeout=30)
            assert process.poll() is None
        yield {pair: port for pair, (_, port) in running.items()}
    finally:
        for process, _ in running.values():
            stop_process(process)


def _ext_proc(port: int, messages: list[pb.ProcessingRequest]) -> list[pb.ProcessingResponse]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(EXT_PROC_PATH,
                                     request_serializer=pb.ProcessingRequest.SerializeToString,
                                     response_deserializer=pb.ProcessingResponse.FromString)
        return list(call(iter(messages), timeout=10))


def _dispatch(port: int) -> Object:
    obj = tyk_object()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return channel.unary_unary(DISPATCH_PATH, request_serializer=Object.SerializeToString,
                                   response_deserializer=Object.FromString)(obj, timeout=10)


def _response_messages() -> list[pb.ProcessingRequest]:
    headers = pb.ProcessingRequest()
    headers.response_headers.headers.headers.add(key=":status", raw_value=b"200")
    headers.response_headers.headers.headers.add(key="content-length",
                                                 raw_value=str(len(BODY)).encode())
    body = pb.ProcessingRequest()
    body.response_body.body = BODY
    body.response_body.end_of_stream = True
    return [headers, body]


@pytest.mark.parametrize("impl", ["floor-readwrite", "async", "inline", "sync"])
def test_ext_proc_servers_answer_like_the_floor(servers, impl):
    cases = {"headers": [ext_proc_message(1), _response_messages()[0]],
             "body": _response_messages()}
    for work, messages in cases.items():
        expected = _ext_proc(servers["floor", work], messages)
        assert len(expected) == len(messages)
        assert _ext_proc(servers[impl, work], messages) == expected
    assert expected[1].response_body.response.body_mutation.body == BODY.upper()


def test_tyk_servers_answer_like_the_floor(servers):
    expected, got = _dispatch(servers["floor", "tyk"]), _dispatch(servers["async", "tyk"])
    assert expected.request.set_headers == {"X-Plugin": "floor"}
    assert got.request.set_headers == {"X-Plugin": "calloutkit"}
    got.request.set_headers["X-Plugin"] = "floor"
    assert got == expected


class _DriftingSection:
    """A section whose machine slows steadily: each measurement is 5% slower than the last.
    Variant "b" does 0.9 x the reference's work per second, "c" 1.1 x."""

    title, unit, reference, paired = "drift", "req/s", "ref", True
    speed = {"ref": 1.0, "b": 0.9, "c": 1.1}

    def __init__(self) -> None:
        self.variants = [Variant(label, None) for label in self.speed]
        self.clock = 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def measure(self, label: str) -> dict[str, float]:
        self.clock += 1
        machine = 1.0 - 0.05 * self.clock
        return {"rate": 1000 * self.speed[label] * machine,
                "cpu_us": 100 / self.speed[label] / machine,
                "p99_ms": 10 / self.speed[label] * (1 + 0.05 * self.clock)}


def test_ratios_are_taken_against_the_reference_measured_around_them():
    import run

    result = run.run_section(_DriftingSection(), rounds=3)
    variants = result["variants"]
    # Steady drift cancels exactly against the mean of the reference either side.
    assert variants["b"]["rate_ratio"] == pytest.approx(0.9)
    assert variants["c"]["rate_ratio"] == pytest.approx(1.1)
    assert variants["c"]["rate_ratio_range"] == pytest.approx([1.1, 1.1])
    assert variants["ref"]["rate_ratio"] == 1.0
    # Every variant measured once a round, the reference before and after each of them.
    assert [len(v["rounds"]) for v in variants.values()] == [9, 3, 3]
    assert variants["b"]["cpu_ratio"] == pytest.approx(1 / 0.9, rel=0.01)
    assert variants["b"]["p99_ratio"] == pytest.approx(1 / 0.9)
    assert variants["ref"]["p99_ratio"] == 1.0


class _GoalSection(_DriftingSection):
    """The drifting section with targets: "b" misses its rate target, "c" meets both."""

    def __init__(self) -> None:
        super().__init__()
        self.variants = [Variant("ref", None),
                         Variant("b", None, goals=(Goal("rate", 0.95, at_most=False),)),
                         Variant("c", None, goals=(Goal("cpu_us", 0.95),
                                                   Goal("p99_ms", 13, of_reference=False)))]


def test_goals_are_checked_against_the_paired_ratios():
    import run

    result = run.run_section(_GoalSection(), rounds=3)
    goals = {(g["variant"], g["target"]): g for g in result["goals"]}
    missed = goals["b", "rate x ref >= 0.95"]
    assert missed["value"] == pytest.approx(0.9) and not missed["met"]
    cpu = goals["c", "CPU/op x ref <= 0.95"]
    assert cpu["value"] == pytest.approx(1 / 1.1, rel=0.01) and cpu["every_round"]
    # An absolute target reads the figure itself: p99 grows with the drift, past 13 ms in
    # the last round only.
    p99 = goals["c", "p99 <= 13"]
    assert p99["met"] and not p99["every_round"]
    report = "\n".join(run.goals_table({"sections": {"drift": result}}))
    assert "FAIL" in report and "pass (not every round)" in report


class _MemorySection(_DriftingSection):
    """Unpaired, as memory sections are: the reference once a round, ratios within it."""

    paired = False

    def measure(self, label: str) -> dict[str, float]:
        self.clock += 1
        return {"kb_per_stream": {"ref": 20.0, "b": 5.0, "c": 30.0}[label] + self.clock % 2}


def test_unpaired_sections_take_ratios_within_the_round():
    import run

    section = _MemorySection()
    section.variants = [Variant("ref", None), Variant("b", None),
                        Variant("c", None, goals=(Goal("kb_per_stream", 1.0),))]
    result = run.run_section(section, rounds=2)
    assert [len(v["rounds"]) for v in result["variants"].values()] == [2, 2, 2]
    assert result["variants"]["b"]["ratios"]["kb_per_stream"]["median"] < 0.3
    (goal,) = result["goals"]
    assert goal["value"] > 1.4 and not goal["met"]


def test_threads_are_read_from_proc_and_grouped_by_name():
    import threading

    import threads

    release = threading.Event()
    helper = threading.Thread(target=release.wait)
    helper.start()
    try:
        found = threads._threads(os.getpid())
    finally:
        release.set()
        helper.join()
    main_name = found[os.getpid()][0]
    groups = {threads._group(os.getpid(), tid, name, main_name)
              for tid, (name, _) in found.items()}
    assert {"event loop (main thread)", "other Python threads (pool)"} <= groups
    assert all(cpu >= 0 for _, cpu in found.values())
    assert threads._group(1, 2, "calloutkit-tran", "python") == "transport thread"
    # A pool thread started from the transport thread inherits its name; the oldest is it.
    assert threads._group(1, 7, "calloutkit-tran", "python", 5) == "other Python threads (pool)"
    assert threads._group(1, 5, "calloutkit-tran", "python", 5) == "transport thread"
