"""AuthzServer behind a real Envoy 1.40 ext_authz filter (gRPC, V3) in front of an echoing
upstream: what reaches the upstream, what reaches the client, failures, load and drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import grpc
import pytest
from authz_harness import envoy_for, get  # noqa: F401 (a fixture)
from conftest import LOOPBACK, free_port, read_all, read_until, spawn, stop_process
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as apb
from google.protobuf import wrappers_pb2
from google.rpc import status_pb2

from calloutkit import AuthzServer, allow_request, deny_request
from calloutkit.testing import Envoy, authz_envoy_config, http_request

pytestmark = pytest.mark.envoy


class Gate(AuthzServer):
    """Routes by path: /allow changes the request, /deny refuses, /boom raises, /raw answers
    with hand-built header options (to pin what Envoy reads)."""

    async def on_check(self, request, context):
        path = request.path.split("?")[0]
        if path == "/allow":
            return allow_request(
                [("x-added", "by-authz")], headers_to_set=[("x-set", "new")],
                headers_to_append=[("x-appended", "second")], headers_to_remove=["x-secret"],
                response_headers_to_add=[("x-authz-said", "yes")],
                query_parameters_to_set=[("page", "2")], query_parameters_to_remove=["debug"],
                dynamic_metadata={"user": "ada"})
        if path == "/deny":
            return deny_request(401, "who are you?\n", [("www-authenticate", "Bearer"),
                                                         ("x-reason", "no token")])
        if path == "/boom":
            raise RuntimeError("secret database password")
        if path == "/raw":
            return _raw_answer()
        if path == "/echo-view":
            return allow_request(headers_to_set=[
                ("x-view", json.dumps({"method": request.method, "host": request.host,
                                       "body": request.body.decode(),
                                       "source": request.source_address,
                                       "port": request.source_port > 0,
                                       "key": request.headers.get("X-Api-Key"),
                                       "route": request.context_extensions}))])
        return None


def _option(key: str, *, value: str = "", raw: bytes = b"", append: bool | None = None,
            action: int | None = None) -> base_pb2.HeaderValueOption:
    option = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value, raw_value=raw))
    if append is not None:
        option.append.CopyFrom(wrappers_pb2.BoolValue(value=append))
    if action is not None:
        option.append_action = action  # type: ignore[assignment]
    return option


def _raw_answer() -> apb.CheckResponse:
    action = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
    return apb.CheckResponse(status=status_pb2.Status(code=0), ok_response=apb.OkHttpResponse(
        headers=[_option("x-value-only", value="v"), _option("x-raw-only", raw=b"r"),
                 _option("x-both", value="from-value", raw=b"from-raw"),
                 _option("x-unset", value="replaced"),
                 _option("x-true", value="added", append=True),
                 _option("x-action", value="replaced-too", action=action)],
        response_headers_to_add=[_option("x-resp-value", value="v"),
                                 _option("x-resp-raw", raw=b"r")]))


async def test_allowed_requests_reach_the_upstream_changed(envoy_for) -> None:
    envoy = await envoy_for(Gate(**LOOPBACK))
    r = await get(envoy, "/allow?debug=1&keep=yes", [
        ("x-added", "client"), ("x-set", "old"), ("x-appended", "first"), ("x-secret", "s")])
    assert r.status == 200, envoy.log_tail()
    seen = json.loads(r.body)
    assert seen["path"] == "/allow?keep=yes&page=2"
    headers = seen["headers"]
    assert headers["x-added"] == "by-authz"  # no append flag: replaced
    assert headers["x-set"] == "new"
    assert headers["x-appended"] == "first,second"
    assert "x-secret" not in headers
    assert r.header("x-authz-said") == "yes"
    # dynamic metadata, in the access log line Envoy writes after the response (its file
    # access log is flushed on a timer, so the line may come a moment later)
    for _ in range(100):
        if "user" in envoy.log_tail() and "ada" in envoy.log_tail():
            break
        await asyncio.sleep(0.05)
    assert "user" in envoy.log_tail() and "ada" in envoy.log_tail(), envoy.log_tail()
    r = await get(envoy, "/anything-else")
    assert r.status == 200 and json.loads(r.body)["path"] == "/anything-else"


async def test_envoy_reads_value_not_raw_value_and_ignores_append_action(envoy_for) -> None:
    """Pins Envoy 1.40's ext_authz reading of HeaderValueOption (the opposite of ext_proc)."""
    envoy = await envoy_for(Gate(**LOOPBACK))
    r = await get(envoy, "/raw", [("x-unset", "orig"), ("x-true", "orig"),
                                  ("x-action", "orig")])
    headers = json.loads(r.body)["headers"]
    assert headers["x-value-only"] == "v"
    assert headers["x-raw-only"] == ""  # raw_value alone: the header arrives empty
    assert headers["x-both"] == "from-value"
    assert headers["x-unset"] == "replaced"
    assert headers["x-true"] == "orig,added"
    assert headers["x-action"] == "replaced-too"
    assert r.header("x-resp-value") == "v" and r.header("x-resp-raw") == ""


async def test_the_view_sees_what_envoy_sends(envoy_for) -> None:
    for raw in (False, True):
        envoy = await envoy_for(Gate(**LOOPBACK), encode_raw_headers=raw,
                                with_request_body={"max_request_bytes": 1024},
                                context_extensions={"route": "main"})
        r = await get(envoy, "/echo-view", [("X-Api-Key", "k1")], "POST", "hello")
        view = json.loads(json.loads(r.body)["headers"]["x-view"])
        assert view == {"method": "POST", "host": f"127.0.0.1:{envoy.port}", "body": "hello",
                        "source": "127.0.0.1", "port": True, "key": "k1",
                        "route": {"route": "main"}}, raw


async def test_denied_requests_get_status_body_and_headers(envoy_for, upstream) -> None:
    envoy = await envoy_for(Gate(**LOOPBACK))
    r = await get(envoy, "/deny")
    assert r.status == 401
    assert r.body == b"who are you?\n"
    assert r.header("www-authenticate") == "Bearer"
    assert r.header("x-reason") == "no token"
    assert not [seen for seen in upstream.requests if seen["path"] == "/deny"]


@pytest.mark.parametrize(("options", "status"), [({}, 403), ({"error_status": 500}, 500)])
async def test_a_raising_callback_is_denied_without_leaking(envoy_for, options,
                                                             status) -> None:
    envoy = await envoy_for(Gate(**LOOPBACK, **options))
    r = await get(envoy, "/boom")
    assert r.status == status
    assert r.body == b"authorization check failed\n"
    assert b"secret" not in r.body and b"RuntimeError" not in r.body
    assert not any("secret" in v for _, v in r.headers)


async def test_abort_leaves_it_to_envoys_status_on_error(envoy_for) -> None:
    envoy = await envoy_for(Gate(**LOOPBACK, error_policy="abort"), status_on_error=503)
    r = await get(envoy, "/boom")
    assert r.status == 503 and b"secret" not in r.body
    allowed = await envoy_for(Gate(**LOOPBACK, error_policy="abort"), failure_mode_allow=True)
    r = await get(allowed, "/boom")
    assert r.status == 200
    assert json.loads(r.body)["path"] == "/boom"


async def test_500_concurrent_checks_are_each_answered_correctly(envoy_for) -> None:
    class Fair(AuthzServer):
        async def on_check(self, request, context):
            await asyncio.sleep(0.05)  # keep them in flight together
            n = int(request.headers["x-n"])
            if n % 3 == 0:
                return deny_request(403, f"denied {n}\n")
            return allow_request(headers_to_set=[("x-checked", str(n))])

    envoy = await envoy_for(Fair(**LOOPBACK))

    async def one(n: int) -> tuple[int, int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", envoy.port)
        writer.write(f"GET /n/{n} HTTP/1.1\r\nhost: x\r\nx-n: {n}\r\n"
                     "connection: close\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return n, int(head.split()[1]), body

    results = await asyncio.gather(*(one(n) for n in range(500)))
    wrong = []
    for n, status, body in results:
        if n % 3 == 0:
            ok = status == 403 and body == f"denied {n}\n".encode()
        else:
            ok = status == 200 and json.loads(body)["headers"]["x-checked"] == str(n)
        if not ok:
            wrong.append((n, status, body[:80]))
    assert wrong == []


async def test_sigterm_lets_checks_in_flight_finish(upstream) -> None:
    process = spawn([sys.executable, "-m", "calloutkit", "serve",
                     "tests/servers/slow_authz_server.py", "--plaintext_address",
                     "127.0.0.1:0", "--combined_health_check", "--disable_tls"],
                    env={"SLOW_SECONDS": "1.5"})
    try:
        line = await asyncio.to_thread(read_until, process, "serving:")
        port = int(line.split("grpc 127.0.0.1:")[1].split(",")[0].split()[0])
        with Envoy(authz_envoy_config(port, upstream.port, timeout="10s")) as envoy:
            in_flight = [asyncio.ensure_future(get(envoy, f"/slow/{n}")) for n in range(5)]
            await asyncio.sleep(0.5)  # every check is now sleeping in the server
            os.kill(process.pid, signal.SIGTERM)
            replies = await asyncio.wait_for(asyncio.gather(*in_flight), 20)
            for n, r in enumerate(replies):
                assert r.status == 200, (n, r.status, r.body)
                seen = json.loads(r.body)
                assert seen["path"] == f"/slow/{n}" and seen["headers"]["x-slow"] == "done"
            assert await asyncio.to_thread(process.wait, 15) == 0
            # Gone: Envoy now answers its own error status (403 by default).
            assert (await get(envoy, "/after")).status == 403
    finally:
        stop_process(process)


def _answering_pid(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}",
                               options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        check = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check",
                                    request_serializer=apb.CheckRequest.SerializeToString,
                                    response_deserializer=apb.CheckResponse.FromString)
        reply = check(apb.CheckRequest(), timeout=10)
        return int(reply.ok_response.headers[0].header.value)


def test_workers_share_the_port_and_health_answers() -> None:
    port, health = free_port(), free_port()
    process = spawn([sys.executable, "-m", "calloutkit", "serve",
                     "tests/servers/pid_authz_server.py", "--plaintext_address",
                     f"127.0.0.1:{port}", "--health_check_address", f"127.0.0.1:{health}",
                     "--disable_tls", "--workers", "2"])
    try:
        read_all(process, {"supervisor": 1, "serving:": 2})
        pids = {_answering_pid(port) for _ in range(40)}
        assert len(pids) == 2 and process.pid not in pids
        assert http_request(f"http://127.0.0.1:{health}/").status == 200
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        stop_process(process)
