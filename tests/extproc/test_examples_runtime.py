"""Examples about the runtime itself, behind one real Envoy (headers only).

structured_logging (one JSON line per request), request_timing (per-stream state) and
async_lookup (an awaited lookup that does not hold up other streams). Envoy's fault filter
after the callout delays chosen requests (``x-envoy-fault-delay-request: <ms>``), so the
timings have something real to measure.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_examples_harness import Gateway, http_filters, load_module

from calloutkit.testing import HttpResponse

pytestmark = pytest.mark.envoy

directory_module = load_module("async_lookup/directory.py")
LOG = io.StringIO()


def _delay_filter(config: dict[str, Any]) -> None:
    http_filters(config).insert(-1, {"name": "envoy.filters.http.fault", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
        "delay": {"header_delay": {}, "percentage": {"numerator": 100}}}})


@pytest.fixture(scope="module")
def directory() -> Iterator[Any]:
    with directory_module.Directory() as running:
        yield running


@pytest.fixture(scope="module")
def gateway(server_transport: str | None, directory: Any) -> Iterator[Gateway]:
    examples = {"structured_logging": {"stream": LOG, "cloud_logging": False},
                "request_timing": {},
                "async_lookup": {"lookup_url": directory.url}}
    # message_timeout above the 1 s slow lookup (the runtime default is 2 s; say it)
    with Gateway(examples, configure=_delay_filter, message_timeout="3s") as gw:
        yield gw


def _delayed(ms: int) -> tuple[str, str]:
    return ("x-envoy-fault-delay-request", str(ms))


# -- structured_logging --------------------------------------------------------------------

def test_structured_logging_writes_one_json_line_per_request(gateway: Gateway) -> None:
    start = len(LOG.getvalue().splitlines())
    ok = gateway.request("structured_logging", "/hello?x=1", headers=[
        ("user-agent", "calloutkit-test/1"), _delayed(150)])
    missing = gateway.request("structured_logging", "/missing", "POST",
                              [("x-echo-status", "404")], body="12345")
    assert (ok.status, missing.status) == (200, 404)
    assert ok.body and ok.header("content-length") == str(len(ok.body))  # nothing changed

    lines = LOG.getvalue().splitlines()[start:]
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "GET /hello?x=1 200"
    assert first["severity"] == "INFO"
    assert (first["method"], first["path"], first["status"]) == ("GET", "/hello?x=1", 200)
    assert first["user_agent"] == "calloutkit-test/1"
    assert first["authority"].startswith("127.0.0.1:")
    assert first["request_id"]  # Envoy's x-request-id, to join with Envoy's access log
    assert first["response_bytes"] == len(ok.body)
    assert list(first["timings_ms"]) == ["response_headers"]  # bodies are not sent here
    assert first["timings_ms"]["response_headers"] >= 120  # the 150 ms delay (timers vary)
    assert first["time"].endswith("Z")

    assert second["severity"] == "WARNING"
    assert (second["method"], second["status"], second["request_bytes"]) == ("POST", 404, 5)


# -- request_timing ------------------------------------------------------------------------

def test_request_timing_stamps_each_response_with_its_own_time(gateway: Gateway) -> None:
    def timed(delay_ms: int) -> HttpResponse:
        headers = [_delayed(delay_ms)] if delay_ms else []
        return gateway.request("request_timing", headers=headers)

    # Concurrent streams: a slow one must not lend its start time to a fast one.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        slow = pool.submit(timed, 400)
        time.sleep(0.05)
        fast = [pool.submit(timed, 0) for _ in range(3)]
        responses = [slow.result(), *(f.result() for f in fast)]
    assert all(r.status == 200 for r in responses)
    elapsed = [float(r.header("x-request-time-ms") or "nan") for r in responses]
    # Envoy's delay timer may fire a few ms early; the fast streams take a few ms
    assert elapsed[0] >= 350
    assert all(0 <= ms < 350 for ms in elapsed[1:])
    assert responses[0].header("server-timing") == f"gateway;dur={elapsed[0]:.3f}"


# -- async_lookup --------------------------------------------------------------------------

def test_async_lookup_adds_the_identity_and_drops_the_key(gateway: Gateway) -> None:
    response = gateway.request("async_lookup", headers=[("x-api-key", "key-alice")])
    assert response.status == 200
    seen = gateway.seen()["headers"]
    assert (seen["x-user"], seen["x-plan"]) == ("alice", "gold")
    assert "x-api-key" not in seen


@pytest.mark.parametrize(("headers", "status"), [
    ([], 401), ([("x-api-key", "key-nobody")], 403)])
def test_async_lookup_rejects_unknown_callers(gateway: Gateway, headers: list[tuple[str, str]],
                                              status: int) -> None:
    before = len(gateway.upstream.requests)
    response = gateway.request("async_lookup", headers=headers)
    assert response.status == status
    assert "error" in json.loads(response.body)
    assert len(gateway.upstream.requests) == before


def test_async_lookup_fails_closed_when_the_directory_is_down(gateway: Gateway) -> None:
    server: Any = gateway.servers["async_lookup"]
    working = server.lookup_url
    server.lookup_url = "http://127.0.0.1:9"  # discard port: nothing listens
    try:
        response = gateway.request("async_lookup", headers=[("x-api-key", "key-alice")])
    finally:
        server.lookup_url = working
    assert response.status == 503
    assert json.loads(response.body) == {"error": "key directory unavailable"}


def test_async_lookup_one_slow_lookup_does_not_delay_others(gateway: Gateway,
                                                            directory: Any) -> None:
    finished: dict[str, float] = {}

    def call(key: str, tag: str) -> HttpResponse:
        response = gateway.request("async_lookup", f"/{tag}", headers=[("x-api-key", key)])
        finished[tag] = time.monotonic()
        return response

    with concurrent.futures.ThreadPoolExecutor(1) as slow_pool, \
            concurrent.futures.ThreadPoolExecutor(16) as pool:
        slow = slow_pool.submit(call, "key-slow", "slow")
        deadline = time.monotonic() + 5
        while "key-slow" not in directory.asked:  # the callout is now awaiting the 1 s lookup
            assert time.monotonic() < deadline, "the slow lookup never reached the directory"
            time.sleep(0.005)
        started = time.monotonic()
        fast = list(pool.map(lambda n: call("key-bob", f"fast-{n}"), range(100)))
        took = time.monotonic() - started
        assert slow.result(timeout=10).status == 200
    assert [r.status for r in fast] == [200] * 100
    assert took < 1.0, f"100 requests took {took:.2f}s while one lookup waited"
    assert max(t for tag, t in finished.items() if tag != "slow") < finished["slow"]
