"""Logs as JSON lines, each naming the stream and the gateway request it was logged in."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
from typing import Any

import pytest
from conftest import REPO, run_cli, spawn, stop_process

from calloutkit import AuthzServer, NetworkCalloutServer, logging_context
from calloutkit.runtime import _logging
from calloutkit.testing import AuthzClient, NetworkCalloutClient
from calloutkit.tyk import Plugin, TykPluginServer
from calloutkit.tyk.testing import Gateway, HttpRequest

CALLOUTKIT = os.path.join(os.path.dirname(sys.executable), "calloutkit")
SERVE = [CALLOUTKIT, "serve", "tests/servers/logging_server.py", "--plaintext_address",
         "127.0.0.1:0", "--disable_tls", "--combined_health_check"]


def _record(line: str) -> dict[str, Any]:
    record = json.loads(line)  # a line that is not JSON fails the test here
    assert isinstance(record, dict), line
    return record


def _send(port: int, stream: dict[str, Any], *flags: str) -> None:
    done = subprocess.run([sys.executable, "-m", "calloutkit", "send", "--address",
                           f"127.0.0.1:{port}", *flags, "-"], input=json.dumps(stream),
                          capture_output=True, text=True, timeout=30, cwd=REPO,
                          start_new_session=True)
    assert done.returncode == 0, done.stderr


def test_serve_log_format_json_names_each_request():
    process = spawn([*SERVE, "--log-format", "json"])
    try:
        assert process.stdout is not None
        records = []
        while not records or "serving:" not in records[-1]["message"]:
            line = process.stdout.readline()
            assert line, f"server exited: {records}"
            records.append(_record(line))
        port = int(re.search(r"grpc 127\.0\.0\.1:(\d+)", records[-1]["message"])[1])

        # The id in the request headers, as Envoy sends it; a failing callback on the way.
        _send(port, {"messages": [
            {"request_headers": {":path": "/a", "x-request-id": "req-from-header"}},
            {"response_headers": {":status": "200", "x-fail": "1"}}]})
        # The id in the stream's gRPC metadata only.
        _send(port, {"messages": [{"request_headers": {":path": "/b"}}]},
              "-H", "x-request-id=req-from-metadata")
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=30)
        assert process.returncode == 0
        records += [_record(line) for line in rest.splitlines()]
    finally:
        stop_process(process)

    for record in records:
        assert record["pid"] == process.pid
        assert record["time"].endswith("Z") and "T" in record["time"]
        assert record["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
    by_message = {(r["logger"], r["message"]): r for r in records}
    # The user's own logger, in a pool thread: the request id from the headers.
    first = by_message[("logging_server", "request headers: 2")]
    assert first["request_id"] == "req-from-header"
    failed = by_message[("calloutkit.extproc._server", "on_response_headers failed")]
    assert failed["request_id"] == "req-from-header"
    assert failed["stream_id"] == first["stream_id"]
    assert "ValueError: asked to fail" in failed["exception"]
    second = by_message[("logging_server", "request headers: 1")]
    assert second["request_id"] == "req-from-metadata"
    assert second["stream_id"] != first["stream_id"]
    # Outside a stream: no ids.
    assert "stream_id" not in records[0] and "request_id" not in records[0]


def test_log_format_from_the_environment_and_bad_values():
    # A config error after parsing is a JSON record too.
    result = run_cli("serve", "tests/conftest.py", env={"CALLOUTKIT_LOG_FORMAT": "JSON"})
    assert result.returncode == 2
    (record,) = [_record(line) for line in result.stderr.splitlines()]
    assert record["level"] == "ERROR"
    assert record["message"].startswith("calloutkit: error: tests/conftest.py defines no server")

    result = run_cli("serve", "tests/conftest.py", env={"CALLOUTKIT_LOG_FORMAT": "xml"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "calloutkit: error: CALLOUTKIT_LOG_FORMAT='xml': expected text or json"]
    result = run_cli("serve", "tests/conftest.py", "--log-format", "xml")
    assert result.returncode == 2
    assert "argument --log-format: invalid choice: 'xml'" in result.stderr
    assert result.stderr.strip().count("\n") == 0 or "usage:" in result.stderr


def test_text_is_the_default():
    result = run_cli("serve", "tests/conftest.py")
    assert result.returncode == 2
    assert result.stderr.startswith("calloutkit: error: tests/conftest.py defines no server")


@pytest.fixture
def json_handler(monkeypatch):
    monkeypatch.setattr(_logging, "enabled", False)
    lines: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = logging_context(Lines())
    assert _logging.enabled
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    yield lines
    root.removeHandler(handler)
    root.setLevel(level)


def test_records_outside_and_inside_a_stream(json_handler):
    logger = logging.getLogger("calloutkit.test")
    logger.warning("outside")
    ids = _logging.begin_stream("rid-1")
    try:
        raise KeyError("boom")
    except KeyError:
        logger.exception("inside %s", "a stream")
    _logging.current.set(None)
    outside, inside = (json.loads(line) for line in json_handler)
    assert set(outside) == {"time", "level", "logger", "message", "pid"}
    assert outside["message"] == "outside" and outside["pid"] == os.getpid()
    assert inside["message"] == "inside a stream"
    assert (inside["stream_id"], inside["request_id"]) == (ids.stream_id, "rid-1")
    assert inside["exception"].startswith("Traceback") and "KeyError: 'boom'" in inside["exception"]


LOOPBACK = {"plaintext_address": ("127.0.0.1", 0), "disable_tls": True,
            "combined_health_check": True}


class Checker(AuthzServer):
    def on_check(self, request, context):  # a def: runs in the thread pool
        logging.getLogger("user.authz").info("checking %s", request.path)


def tyk_plugin(call):
    logging.getLogger("user.tyk").info("plugin")


class Plugins(TykPluginServer):
    plugins = [Plugin("Pre", tyk_plugin, hook="pre")]


async def test_authz_and_tyk_calls_carry_the_gateways_request_id(json_handler):
    # Each call in a task of its own, as grpc.aio runs each RPC.
    authz = AuthzClient(Checker(**LOOPBACK))
    await asyncio.create_task(authz.check(path="/x", headers={"X-Request-Id": "authz-1"}))
    await asyncio.create_task(AuthzClient(Checker(**LOOPBACK), [("x-request-id", "meta-2")])
                              .check(path="/y"))
    async with Gateway(Plugins(**LOOPBACK)) as gateway:
        await asyncio.create_task(gateway.request_hook(
            "pre", "Pre", HttpRequest(headers=[("X-Request-ID", "tyk-3")])))
    records = {r["logger"] + " " + r["message"]: r for r in map(json.loads, json_handler)}
    assert records["user.authz checking /x"]["request_id"] == "authz-1"
    assert records["user.authz checking /y"]["request_id"] == "meta-2"
    assert records["user.tyk plugin"]["request_id"] == "tyk-3"
    assert len({r["stream_id"] for r in records.values()}) == 3


def test_nothing_is_set_while_no_handler_asked(monkeypatch):
    monkeypatch.setattr(_logging, "enabled", False)

    async def check() -> _logging.StreamLog | None:
        await AuthzClient(Checker(**LOOPBACK)).check(headers={"x-request-id": "r"})
        return _logging.current.get()

    assert asyncio.run(check()) is None


class Passthrough(NetworkCalloutServer):
    def on_read_data(self, data, end_of_stream, context):
        logging.getLogger("user.l4").info("read %d", len(data))


async def test_an_l4_stream_carries_its_id_and_the_metadatas_request_id(json_handler):
    client = NetworkCalloutClient(Passthrough(**LOOPBACK), [("x-request-id", "l4-1")])
    async with client.stream() as connection:
        await connection.read(b"abc")
        await connection.read(b"de")
    async with NetworkCalloutClient(Passthrough(**LOOPBACK)).stream() as connection:
        await connection.read(b"f")
    first, second, other = (r for r in map(json.loads, json_handler) if r["logger"] == "user.l4")
    assert [r["message"] for r in (first, second, other)] == ["read 3", "read 2", "read 1"]
    assert first["stream_id"] == second["stream_id"] != other["stream_id"]
    assert first["request_id"] == second["request_id"] == "l4-1"
    assert "request_id" not in other
