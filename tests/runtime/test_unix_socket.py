"""Every server kind listens on a unix socket with ``--plaintext_address unix:/PATH``.

Tyk Gateway accepts ``unix:///path.sock`` as its plugin server; Envoy can reach a callout
server over a pipe. Each test runs the real CLI and talks to it with grpcio over the socket.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from conftest import read_until, spawn, stop_process
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpHeaders, ProcessingRequest
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub
from grpc_health.v1 import health_pb2, health_pb2_grpc

from calloutkit import CalloutServer, ConfigError, parse_address
from calloutkit.tyk import Hook, Object
from calloutkit.tyk.testing import HttpRequest, request_object

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def serve_on(socket_path: Path, example: str) -> subprocess.Popen[str]:
    process = spawn([sys.executable, "-m", "calloutkit", "serve", str(EXAMPLES / example),
                     "--plaintext_address", f"unix:{socket_path}", "--combined_health_check"])
    line = read_until(process, "serving")
    assert f"grpc unix:{socket_path}" in line
    return process


def stop_and_check_removed(process: subprocess.Popen[str], socket_path: Path) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    stop_process(process)
    assert not socket_path.exists()


def healthy(channel: grpc.Channel, service: str = "") -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=10)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def test_a_tyk_server_serves_dispatch_and_health_on_a_unix_socket(tmp_path: Path) -> None:
    socket_path = tmp_path / "plugins.sock"
    process = serve_on(socket_path, "tyk_header_injection")
    try:
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            assert healthy(channel) and healthy(channel, "coprocess.Dispatcher")
            sent = request_object(Hook.PRE, "AddCorrelationId", HttpRequest("GET", "/x"))
            reply = channel.unary_unary("/coprocess.Dispatcher/Dispatch")(
                sent.SerializeToString(), timeout=10)
        returned = Object.FromString(reply)
        assert returned.request.set_headers, "the plugin ran and set a header"
        stop_and_check_removed(process, socket_path)
    finally:
        stop_process(process)


def test_an_l7_callout_server_serves_process_and_health_on_a_unix_socket(
        tmp_path: Path) -> None:
    socket_path = tmp_path / "callout.sock"
    process = serve_on(socket_path, "add_header")
    try:
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            assert healthy(channel)
            stub = ExternalProcessorStub(channel)
            request = ProcessingRequest(request_headers=HttpHeaders(end_of_stream=True))
            (reply,) = list(stub.Process(iter([request]), timeout=10))
        mutation = reply.request_headers.response.header_mutation
        assert [h.header.key for h in mutation.set_headers] == ["header-request"]
        stop_and_check_removed(process, socket_path)
    finally:
        stop_process(process)


@pytest.mark.parametrize(("text", "expected"), [
    ("unix:/run/p.sock", ("unix:/run/p.sock", 0)),
    ("unix:///run/p.sock", ("unix:/run/p.sock", 0)),
    ("unix:p.sock", (f"unix:{os.path.abspath('p.sock')}", 0)),
])
def test_unix_addresses_parse_to_grpc_form(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(("options", "message"), [
    ({"plaintext_address": "unix:", "disable_tls": True}, "names no socket path"),
    ({"plaintext_address": "unix:/x.sock", "plaintext_port": 9, "disable_tls": True},
     "a unix socket address (unix:/x.sock) has no port"),
    ({"plaintext_address": "unix:/x.sock", "workers": 2, "disable_tls": True,
      "combined_health_check": True}, "workers > 1 cannot share a unix socket"),
    ({"health_check_address": "unix:/h.sock", "disable_tls": True}, "not a unix socket"),
])
def test_bad_unix_options_are_one_line_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CalloutServer(**options)  # type: ignore[arg-type]


async def test_a_path_that_is_not_a_free_socket_is_refused(tmp_path: Path) -> None:
    taken = tmp_path / "file"
    taken.write_text("not a socket")
    server = CalloutServer(plaintext_address=f"unix:{taken}", disable_tls=True,
                           combined_health_check=True)
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        await server.start()
    live = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(live))
        listener.listen()
        server = CalloutServer(plaintext_address=f"unix:{live}", disable_tls=True,
                               combined_health_check=True)
        with pytest.raises(ConfigError, match="another server listens on it"):
            await server.start()
    server = CalloutServer(plaintext_address=f"unix:{tmp_path}/no/such/dir.sock",
                           disable_tls=True, combined_health_check=True)
    with pytest.raises(ConfigError, match="no folder"):
        await server.start()
