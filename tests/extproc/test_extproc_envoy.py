"""CalloutServer through a real Envoy 1.40: every phase, every body mode, errors."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from conftest import LOOPBACK, Certs, free_port

from calloutkit import (
    CalloutKitError,
    CalloutServer,
    add_body_mutation,
    add_header_mutation,
    add_trailer_mutation,
    body_contains,
    get_header,
    header_immediate_response,
)
from calloutkit.testing import Envoy, UpstreamServer, envoy_config, http_request

pytestmark = pytest.mark.envoy


class Callout(CalloutServer):
    """Changes something observable in every phase; /deny and /boom misbehave on purpose."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen: list[str] = []

    def on_request_headers(self, headers, context):
        self.seen.append("request_headers")
        path = get_header(headers, ":path", "")
        if path.startswith("/deny"):
            return header_immediate_response(403, headers=[("x-denied-by", "calloutkit")],
                                             body="denied\n", details="test_deny")
        if path.startswith("/boom"):
            raise RuntimeError("secret internal detail")
        return add_header_mutation(add=[("x-req-added", "yes")], remove=["x-remove-me"])

    async def on_response_headers(self, headers, context):
        self.seen.append("response_headers")
        return add_header_mutation(add=[("x-resp-added", "yes")])

    def on_request_body(self, body, context):
        if body_contains(body, "forbidden"):
            return header_immediate_response(413, body="no forbidden words\n")
        if context.request_body_mode == 2:  # BUFFERED: replace whole body, longer
            return add_body_mutation(body=b"replaced request body, much longer than before")
        return add_body_mutation(body=body.body.upper())  # STREAMED / FULL_DUPLEX: per chunk

    def on_response_body(self, body, context):
        if context.response_body_mode == 2:
            return add_body_mutation(body=b"short")
        return None

    def on_request_trailers(self, trailers, context):
        return add_trailer_mutation(add=[("x-req-trailer-added", "t1")])

    def on_response_trailers(self, trailers, context):
        return add_trailer_mutation(add=[("x-resp-trailer-added", "t2")])


@pytest.fixture(params=["grpcio", "native"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def callout(transport: str) -> AsyncIterator[Callout]:
    server = Callout(**LOOPBACK, transport=transport)
    await server.start()
    yield server
    await server.stop(1)


@pytest.fixture
def envoy_for(upstream: UpstreamServer) -> Iterator[Any]:
    started: list[Envoy] = []

    def start(server: CalloutServer, **options: Any) -> Envoy:
        envoy = Envoy(envoy_config(server.plaintext_port or 0, upstream.port, **options))
        started.append(envoy.start())
        return envoy

    yield start
    for envoy in started:
        envoy.stop()


def request(*args: Any, **kwargs: Any) -> Any:
    return asyncio.to_thread(http_request, *args, **kwargs)


async def test_header_mutation_both_ways(callout, envoy_for, upstream):
    envoy = envoy_for(callout)
    response = await request(envoy.url + "/hello", headers=[("x-remove-me", "1")])
    assert response.status == 200
    assert response.header("x-resp-added") == "yes"
    seen = json.loads(response.body)["headers"]
    assert seen["x-req-added"] == "yes"
    assert "x-remove-me" not in seen


async def test_buffered_bodies_change_length_both_ways(callout, envoy_for, upstream):
    envoy = envoy_for(callout, processing_mode={"request_body_mode": "BUFFERED",
                                                "response_body_mode": "BUFFERED"})
    response = await request(envoy.url + "/upload", "POST", body=b"tiny")
    assert response.status == 200, envoy.log_tail()
    assert upstream.requests[-1]["body"] == "replaced request body, much longer than before"
    assert response.body == b"short"
    assert response.header("content-length") == "5"


async def test_buffered_request_body_reaches_upstream_with_fixed_length(callout, envoy_for,
                                                                        upstream):
    envoy = envoy_for(callout, processing_mode={"request_body_mode": "BUFFERED"})
    response = await request(envoy.url + "/upload", "POST", body=b"tiny")
    assert response.status == 200, envoy.log_tail()
    seen = json.loads(response.body)
    assert seen["body"] == "replaced request body, much longer than before"
    assert seen["headers"]["content-length"] == str(len(seen["body"]))


async def test_streamed_request_body_chunk_by_chunk(callout, envoy_for):
    envoy = envoy_for(callout, processing_mode={"request_body_mode": "STREAMED"})
    response = await request(envoy.url + "/stream", "POST", chunks=[b"part1-", b"part2-",
                                                                    b"part3"])
    assert response.status == 200, envoy.log_tail()
    assert json.loads(response.body)["body"] == "PART1-PART2-PART3"


async def test_full_duplex_streamed_request_body(callout, envoy_for):
    envoy = envoy_for(callout, processing_mode={
        "request_body_mode": "FULL_DUPLEX_STREAMED", "request_trailer_mode": "SEND",
        "response_trailer_mode": "SEND"})
    response = await request(envoy.url + "/duplex", "POST", body=b"abc")
    assert response.status == 200, envoy.log_tail()
    assert json.loads(response.body)["body"] == "ABC"


async def test_trailers_both_ways(callout, envoy_for):
    envoy = envoy_for(callout, processing_mode={"request_trailer_mode": "SEND",
                                                "response_trailer_mode": "SEND"})
    response = await request(envoy.url + "/trailers", "POST", chunks=[b"data"],
                             trailers=[("x-client-trailer", "c1")],
                             headers=[("x-echo-trailer", "x-upstream-trailer=u1")])
    assert response.status == 200, envoy.log_tail()
    seen = json.loads(response.body)
    assert seen["trailers"] == {"x-client-trailer": "c1", "x-req-trailer-added": "t1"}
    assert response.trailer("x-upstream-trailer") == "u1"
    assert response.trailer("x-resp-trailer-added") == "t2"


async def test_immediate_response_from_request_headers(callout, envoy_for, upstream):
    envoy = envoy_for(callout)
    before = len(upstream.requests)
    response = await request(envoy.url + "/deny")
    assert response.status == 403
    assert response.header("x-denied-by") == "calloutkit"
    assert response.body == b"denied\n"
    assert len(upstream.requests) == before


async def test_immediate_response_from_request_body(callout, envoy_for, upstream):
    envoy = envoy_for(callout, processing_mode={"request_body_mode": "BUFFERED"})
    before = len(upstream.requests)
    response = await request(envoy.url + "/upload", "POST", body=b"some forbidden text")
    assert response.status == 413
    assert response.body == b"no forbidden words\n"
    assert len(upstream.requests) == before


async def test_raising_callback_fails_closed_without_leaking(callout, envoy_for, caplog):
    envoy = envoy_for(callout)
    response = await request(envoy.url + "/boom")
    assert response.status == 500
    assert b"secret" not in response.body
    assert any("on_request_headers failed" in r.message for r in caplog.records)
    again = await request(envoy.url + "/fine")
    assert again.status == 200
    assert again.header("x-resp-added") == "yes"


async def test_observability_mode_replies_are_ignored_and_change_nothing(callout, envoy_for):
    envoy = envoy_for(callout, observability_mode=True)
    callout.seen.clear()
    response = await request(envoy.url + "/observed")
    assert response.status == 200
    assert response.header("x-resp-added") is None
    assert "x-req-added" not in json.loads(response.body)["headers"]
    for _ in range(100):  # the callbacks ran, asynchronously to the request
        if callout.seen.count("response_headers"):
            break
        await asyncio.sleep(0.02)
    assert callout.seen == ["request_headers", "response_headers"]


@pytest.mark.parametrize("transport", ["grpcio", "native"])
async def test_envoy_over_tls_to_the_callout(certs: Certs, upstream, transport):
    server = Callout(secure_address=("127.0.0.1", 0), disable_plaintext=True,
                     combined_health_check=True, cert_chain_path=certs.cert_path,
                     private_key_path=certs.key_path, transport=transport)
    await server.start()
    try:
        assert server.plaintext_port is None and server.secure_port
        with Envoy(envoy_config(server.secure_port, upstream.port,
                                callout_tls_ca=certs.ca_path)) as envoy:
            response = await request(envoy.url + "/tls")
        assert response.status == 200
        assert response.header("x-resp-added") == "yes"
    finally:
        await server.stop(1)


def envoy_stats(envoy: Envoy, prefix: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{envoy.admin_url}/stats?filter=^{prefix}", timeout=10) as reply:
        lines = reply.read().decode().splitlines()
    return {name: int(value) for name, _, value in (line.partition(": ") for line in lines)
            if value.isdigit()}


async def test_two_thousand_requests_on_one_connection_without_an_error(callout, envoy_for):
    # Envoy resets every ext_proc stream once its HTTP request is done: the normal end of a
    # stream, which must never make the server refuse or close the connection.
    envoy = envoy_for(callout)

    def run() -> list[tuple[int, str | None]]:
        return [(r.status, r.header("x-resp-added")) for r in (
            http_request(envoy.url + f"/n/{n}") for n in range(2000))]

    results = await asyncio.to_thread(run)
    assert results == [(200, "yes")] * 2000
    stats = envoy_stats(envoy, "cluster.callout.upstream_")
    assert stats["cluster.callout.upstream_cx_total"] == 1
    assert stats["cluster.callout.upstream_rq_total"] == 2000
    assert stats["cluster.callout.upstream_cx_protocol_error"] == 0
    assert stats.get("cluster.callout.upstream_cx_destroy_remote", 0) == 0


def processes_using(folder: str) -> list[int]:
    """Live processes with ``folder`` on their command line (Envoy's config lives there)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if folder.encode() in handle.read():
                    found.append(int(pid))
        except OSError:
            pass  # it ended while we looked
    return found


async def test_stop_removes_the_temporary_folder_and_keeps_the_log(callout, upstream,
                                                                   temp_dir):
    envoy = Envoy(envoy_config(callout.plaintext_port or 0, upstream.port))
    await asyncio.to_thread(envoy.start)
    try:
        [folder] = os.listdir(temp_dir)
        assert folder.startswith("calloutkit-envoy-")
        assert (await request(envoy.url + "/kept")).status == 200
    finally:
        await asyncio.to_thread(envoy.stop)
    assert os.listdir(temp_dir) == []
    assert "GET /kept 200" in envoy.log_tail()
    await asyncio.to_thread(envoy.start)  # it can start again, with a new folder
    assert len(os.listdir(temp_dir)) == 1
    await asyncio.to_thread(envoy.stop)
    assert os.listdir(temp_dir) == []


async def test_a_with_block_that_raises_leaves_nothing_behind(callout, upstream, temp_dir):
    def run() -> None:
        with Envoy(envoy_config(callout.plaintext_port or 0, upstream.port)):
            assert processes_using(temp_dir)
            raise RuntimeError("the test failed")

    with pytest.raises(RuntimeError, match="the test failed"):
        await asyncio.to_thread(run)
    assert processes_using(temp_dir) == []
    assert os.listdir(temp_dir) == []


@pytest.mark.no_server
def test_an_envoy_that_exits_at_start_leaves_nothing_behind(upstream, temp_dir):
    config = envoy_config(free_port(), upstream.port)
    config["static_resources"]["listeners"][0]["address"]["socket_address"]["address"] = "nowhere"
    envoy = Envoy(config)
    with pytest.raises(CalloutKitError, match=r"envoy exited with 1: .*nowhere"):
        envoy.start()
    assert envoy.process is None
    assert os.listdir(temp_dir) == []


@pytest.mark.no_server
def test_an_envoy_never_ready_is_stopped_and_leaves_nothing_behind(upstream, temp_dir):
    envoy = Envoy(envoy_config(free_port(), upstream.port))
    with pytest.raises(CalloutKitError, match="envoy did not become ready in 0s"):
        envoy.start(timeout=0)  # started, then given no time at all
    assert processes_using(temp_dir) == []
    assert os.listdir(temp_dir) == []


# -- code written for the documented callout API, behind Envoy ---------------------------------

class DocumentedStyle(CalloutServer):
    """A plain def process() that edits what super().process() gives, mixed-case header keys,
    and an empty body that must leave the body alone."""

    def process(self, callout, context):
        resp = super().process(callout, context)
        if resp.HasField("immediate_response"):
            return resp
        if callout.HasField("response_headers"):
            option = resp.response_headers.response.header_mutation.set_headers.add()
            option.header.key, option.header.raw_value = "X-From-Process", b"yes"
        return resp

    def on_request_headers(self, headers, context):
        if get_header(headers, ":path", "").startswith("/deny"):
            return header_immediate_response(403, headers=[("X-Denied-By", "calloutkit")])
        return add_header_mutation(add=[("X-Req-Mixed", "yes")], remove=["X-Remove-Me"])

    async def on_response_headers(self, headers, context):
        return add_header_mutation(add=[("X-Resp-Mixed", "yes")])

    def on_request_body(self, body, context):
        return add_body_mutation(body="")  # documented: changes nothing

    def on_response_body(self, body, context):
        return add_body_mutation(body=b"", clear_body=True)


@pytest.fixture
async def documented_style() -> AsyncIterator[DocumentedStyle]:
    server = DocumentedStyle(**LOOPBACK)
    await server.start()
    yield server
    await server.stop(1)


async def test_a_def_process_override_calling_super_works_behind_envoy(documented_style,
                                                                       envoy_for):
    envoy = envoy_for(documented_style)
    response = await request(envoy.url + "/hello", headers=[("x-remove-me", "1")])
    assert response.status == 200, envoy.log_tail()
    assert response.header("x-from-process") == "yes"
    assert response.header("x-resp-mixed") == "yes"  # Envoy lower-cases the keys we kept
    seen = json.loads(response.body)["headers"]
    assert seen["x-req-mixed"] == "yes"
    assert "x-remove-me" not in seen
    denied = await request(envoy.url + "/deny")
    assert denied.status == 403
    assert denied.header("x-denied-by") == "calloutkit"


async def test_an_empty_body_mutation_leaves_the_body_and_clear_body_empties_it(
        documented_style, envoy_for, upstream):
    envoy = envoy_for(documented_style, processing_mode={"request_body_mode": "BUFFERED",
                                                         "response_body_mode": "BUFFERED"})
    response = await request(envoy.url + "/upload", "POST", body=b"keep me")
    assert response.status == 200, envoy.log_tail()
    assert upstream.requests[-1]["body"] == "keep me"
    assert response.body == b""
