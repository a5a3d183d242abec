"""Body examples behind one real Envoy with request and response bodies BUFFERED.

basic, add_body, add_custom_response and observability, each asserted as the upstream and
the client see the request and the response.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from test_examples_harness import Gateway

from calloutkit.testing import http_request

pytestmark = pytest.mark.envoy

BUFFERED = {"request_body_mode": "BUFFERED", "response_body_mode": "BUFFERED"}


@pytest.fixture(scope="module")
def gateway(server_transport: str | None) -> Iterator[Gateway]:
    examples = {"basic": {}, "add_body": {}, "add_custom_response": {},
                "observability": {"metrics_port": 0, "metrics_host": "127.0.0.1"}}
    # allow_all_routing: without it Envoy ignores basic's :authority rewrite
    with Gateway(examples, processing_mode=BUFFERED,
                 filter_options={"mutation_rules": {"allow_all_routing": True}}) as gw:
        yield gw


# -- basic ---------------------------------------------------------------------------------

def test_basic_rewrites_the_request_both_in_headers_and_body(gateway: Gateway) -> None:
    response = gateway.request("basic", "/upload?x=1", "POST",
                               [("foo", "bar"), ("content-type", "text/plain")], "hello world")
    assert response.status == 200
    seen = gateway.seen()
    assert seen["path"] == "/"
    assert seen["headers"]["host"] == "service.calloutkit.example"
    assert seen["headers"]["header-request"] == "request"
    assert "foo" not in seen["headers"]
    assert seen["body"] == "replaced-body"
    assert seen["headers"]["content-length"] == str(len("replaced-body"))


def test_basic_adds_a_response_header_and_clears_the_body(gateway: Gateway) -> None:
    response = gateway.request("basic", "/", "POST", body="hi")
    assert response.status == 200
    assert response.header("hello") == "calloutkit"
    assert response.body == b""
    assert response.header("content-length") == "0"


# -- add_body ------------------------------------------------------------------------------

def test_add_body_appends_to_the_request_and_replaces_the_response(gateway: Gateway) -> None:
    response = gateway.request("add_body", "/", "POST", body="original")
    assert response.status == 200
    seen = gateway.seen()
    assert seen["body"] == "original-added-body"
    assert seen["headers"]["content-length"] == str(len("original-added-body"))
    assert response.body == b"new-body"
    assert response.header("content-length") == "8"


# -- add_custom_response -------------------------------------------------------------------

def test_custom_response_denies_a_bad_header_with_403(gateway: Gateway) -> None:
    before = len(gateway.upstream.requests)
    response = gateway.request("add_custom_response", headers=[("bad-header", "1")])
    assert response.status == 403
    assert response.body == b"denied: bad header\n"
    assert len(gateway.upstream.requests) == before


def test_custom_response_denies_a_bad_body_with_403(gateway: Gateway) -> None:
    before = len(gateway.upstream.requests)
    response = gateway.request("add_custom_response", "/", "POST", body="this is a bad-body")
    assert response.status == 403
    assert response.body == b"denied: bad body\n"
    assert len(gateway.upstream.requests) == before


def test_custom_response_mocks_header_and_body(gateway: Gateway) -> None:
    response = gateway.request("add_custom_response", "/", "POST", [("mock", "1")],
                               "please mock me")
    assert response.status == 200
    seen = gateway.seen()
    assert seen["headers"]["mock-response"] == "mocked-value"
    assert "header-request" not in seen["headers"]
    assert seen["body"] == "mocked-body"


def test_custom_response_standard_flow(gateway: Gateway) -> None:
    response = gateway.request("add_custom_response", "/", "POST", body="payload")
    assert response.status == 200
    seen = gateway.seen()
    assert seen["headers"]["header-request"] == "request"
    assert seen["body"] == "payload-added-body"
    assert response.header("header-response") == "response"
    assert response.body == b"new-body"


def test_custom_response_judges_the_upstream_answer_too(gateway: Gateway) -> None:
    mocked = gateway.request("add_custom_response", headers=[("x-echo-body", "a mock answer")])
    assert mocked.status == 200
    assert mocked.body == b"mocked-body"

    denied = gateway.request("add_custom_response", headers=[("x-echo-body", "bad-body leak")])
    assert denied.status == 403  # the upstream answered, but the client never sees it
    assert denied.body == b"denied: bad body\n"


# -- observability -------------------------------------------------------------------------

def test_observability_counts_every_phase_and_serves_the_counts(gateway: Gateway) -> None:
    port = gateway.servers["observability"].metrics_port  # type: ignore[attr-defined]

    def counts() -> dict[str, int]:
        response = http_request(f"http://127.0.0.1:{port}/counters")
        assert response.status == 200
        result: dict[str, int] = json.loads(response.body)
        return result

    before = counts()
    for n in range(3):
        response = gateway.request("observability", "/", "POST", body=f"body {n}")
        assert response.status == 200
        assert gateway.seen()["body"] == f"body {n}"  # counted, never changed
    after = counts()
    grown = {phase: after[phase] - before[phase] for phase in after}
    assert grown == {"request_headers": 3, "request_body": 3, "request_trailers": 0,
                     "response_headers": 3, "response_body": 3, "response_trailers": 0}

    metrics = http_request(f"http://127.0.0.1:{port}/metrics")
    assert metrics.header("content-type", "").startswith("text/plain")
    assert (f'calloutkit_callbacks_total{{phase="request_headers"}} '
            f'{after["request_headers"]}\n').encode() in metrics.body
    assert http_request(f"http://127.0.0.1:{port}/other").status == 404
