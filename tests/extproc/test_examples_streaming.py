"""Streaming examples behind one real Envoy: bodies STREAMED, trailers SEND.

streaming_transform runs as its own process (``calloutkit serve examples/streaming_transform``)
so its memory can be measured while 50 MB go through it; trailers runs in process.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterator

import pytest
from conftest import read_until, spawn, stop_process
from test_examples_harness import Gateway

pytestmark = pytest.mark.envoy

STREAMED = {"request_body_mode": "STREAMED", "response_body_mode": "STREAMED",
            "request_trailer_mode": "SEND", "response_trailer_mode": "SEND"}
MB = 1 << 20


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in kB."""
    out = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def reset_peak(pid: int) -> None:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so the peak is this test's."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass  # without it, the peak since start is measured: stricter, still valid


@pytest.fixture(scope="module")
def transform(server_transport: str | None) -> Iterator[tuple[int, int]]:
    """``calloutkit serve examples/streaming_transform`` on a free port: (pid, port)."""
    process = spawn([sys.executable, "-m", "calloutkit", "serve",
                     "examples/streaming_transform", "--plaintext_address", "127.0.0.1:0",
                     "--disable_tls", "--combined_health_check"],
                    env={"REDACT_WORDS": "secret"})
    try:
        line = read_until(process, "serving:")
        match = re.search(r"grpc 127\.0\.0\.1:(\d+)", line)
        assert match, line
        yield process.pid, int(match.group(1))
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def gateway(transform: tuple[int, int]) -> Iterator[Gateway]:
    with Gateway(["trailers"], external={"streaming_transform": transform[1]},
                 processing_mode=STREAMED) as gw:
        yield gw


# -- streaming_transform -------------------------------------------------------------------

def test_streaming_transform_masks_words_across_chunk_boundaries(gateway: Gateway) -> None:
    # The word fills 6 of every 7 bytes, so wherever Envoy cuts the chunks, almost every cut
    # splits a word: the masking is right only if the bytes kept back work.
    body = b"secret." * (2 * MB // 7) + b"ends with a secr"
    response = gateway.request("streaming_transform", "/", "POST", [("x-echo-raw", "1")], body)
    assert response.status == 200
    masked = body.replace(b"secret", b"******")
    seen = gateway.seen()
    assert seen["body_length"] == len(masked)
    assert seen["headers"].get("transfer-encoding") == "chunked"  # STREAMED drops the length
    assert b"secret" not in response.body
    assert response.body == masked  # masked on the way in, and again (no-op) on the way out


def test_streaming_transform_holds_50_mb_in_constant_memory(
        gateway: Gateway, transform: tuple[int, int]) -> None:
    pid = transform[0]
    # A 10 MB warm-up lets the process reach its steady state (gRPC buffers, allocator
    # arenas). If memory grew with the body, the 50 MB that follow would show it five times.
    warm = gateway.request("streaming_transform", "/", "POST", [("x-echo-raw", "1")],
                           b"secret " * (10 * MB // 7))
    assert warm.status == 200
    reset_peak(pid)
    baseline = memory_kb(pid)["VmRSS"]

    unit = b"payload with a secret inside, "
    body = unit * (50 * MB // len(unit))
    response = gateway.request("streaming_transform", "/big", "POST", [("x-echo-raw", "1")],
                               body, timeout=120)
    peak = memory_kb(pid)["VmHWM"]
    assert response.status == 200
    assert len(response.body) == len(body) >= 50 * MB - len(unit)
    assert hashlib.sha256(response.body).digest() == hashlib.sha256(
        body.replace(b"secret", b"******")).digest()
    growth_mb = (peak - baseline) / 1024
    assert growth_mb < 20, f"peak RSS grew by {growth_mb:.1f} MB for a 50 MB body each way"


# -- trailers ------------------------------------------------------------------------------

def test_trailers_verifies_the_client_digest(gateway: Gateway) -> None:
    chunks = [b"first chunk ", b"second chunk ", b"third"]
    good = hashlib.sha256(b"".join(chunks)).hexdigest()
    response = gateway.request("trailers", "/upload", "POST", chunks=chunks,
                               trailers=[("x-content-sha256", good)])
    assert response.status == 200
    seen = gateway.seen()
    assert seen["body"] == "first chunk second chunk third"  # streamed on untouched
    assert seen["trailers"] == {"x-content-sha256": good, "x-content-verified": "true"}

    gateway.request("trailers", "/upload", "POST", chunks=chunks,
                    trailers=[("x-content-sha256", "0" * 64)])
    assert gateway.seen()["trailers"]["x-content-verified"] == "false"


def test_trailers_adds_a_digest_to_the_response_trailers(gateway: Gateway) -> None:
    response = gateway.request("trailers", "/download", headers=[
        ("x-echo-trailer", "x-internal-debug=1,x-upstream=done")])
    assert response.status == 200
    assert response.trailer("x-body-sha256") == hashlib.sha256(response.body).hexdigest()
    assert response.trailer("x-upstream") == "done"
    assert response.trailer("x-internal-debug") is None


def test_trailers_need_trailers_to_change(gateway: Gateway) -> None:
    response = gateway.request("trailers", "/plain", "POST", body="no trailers here")
    assert response.status == 200
    assert gateway.seen()["trailers"] == {}
    assert response.trailers == []
