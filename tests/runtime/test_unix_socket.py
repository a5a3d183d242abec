"""Every server kind listens on a unix socket with ``--plaintext_address unix:/PATH``.

Tyk Gateway accepts ``unix:///path.sock`` as its plugin server; Envoy can reach a callout
server over a pipe. Each test runs the real CLI (or a server in process) and talks to it with
grpcio over the socket, on both transports.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from conftest import Certs, read_until, spawn, stop_process
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpHeaders, ProcessingRequest
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub
from grpc_health.v1 import health_pb2, health_pb2_grpc

from calloutkit import CalloutServer, ConfigError, add_header_mutation, parse_address
from calloutkit.tyk import Hook, Object
from calloutkit.tyk.testing import HttpRequest, request_object

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TRANSPORTS = ["grpcio", "native"]


def serve_on(socket_path: Path, example: str, transport: str) -> subprocess.Popen[str]:
    process = spawn([sys.executable, "-m", "calloutkit", "serve", str(EXAMPLES / example),
                     "--plaintext_address", f"unix:{socket_path}", "--combined_health_check",
                     "--transport", transport])
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


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_tyk_server_serves_dispatch_and_health_on_a_unix_socket(tmp_path: Path,
                                                                  transport: str) -> None:
    socket_path = tmp_path / "plugins.sock"
    process = serve_on(socket_path, "tyk_header_injection", transport)
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


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_l7_callout_server_serves_process_and_health_on_a_unix_socket(
        tmp_path: Path, transport: str) -> None:
    socket_path = tmp_path / "callout.sock"
    process = serve_on(socket_path, "add_header", transport)
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


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_path_that_is_not_a_free_socket_is_refused(tmp_path: Path,
                                                           transport: str) -> None:
    taken = tmp_path / "file"
    taken.write_text("not a socket")
    server = CalloutServer(plaintext_address=f"unix:{taken}", disable_tls=True,
                           combined_health_check=True, transport=transport)
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        await server.start()
    live = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(live))
        listener.listen()
        server = CalloutServer(plaintext_address=f"unix:{live}", disable_tls=True,
                               combined_health_check=True, transport=transport)
        with pytest.raises(ConfigError, match="another server listens on it"):
            await server.start()
        assert live.exists()  # the live server's file is left alone
    server = CalloutServer(plaintext_address=f"unix:{tmp_path}/no/such/dir.sock",
                           disable_tls=True, combined_health_check=True, transport=transport)
    with pytest.raises(ConfigError, match="no folder"):
        await server.start()
    assert taken.read_text() == "not a socket"


class Peer(CalloutServer):
    """Answers with what the callback sees of its caller."""

    def on_request_headers(self, headers, context):
        identity = context.peer_identity
        return add_header_mutation(add=[
            ("x-peer", context.peer()),
            ("x-identity", identity.common_name if identity else "-")])


def exchange(channel: grpc.Channel) -> dict[str, str]:
    request = ProcessingRequest(request_headers=HttpHeaders(end_of_stream=True))
    (reply,) = list(ExternalProcessorStub(channel).Process(iter([request]), timeout=10))
    mutation = reply.request_headers.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


async def ask(channel: grpc.Channel) -> dict[str, str]:
    """One request-headers exchange (off the loop the server runs on); what it added."""
    return await asyncio.to_thread(exchange, channel)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_stale_socket_file_is_replaced_and_removed_on_stop(tmp_path: Path,
                                                                   transport: str) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as dead:  # bound, then closed: nobody listens
        dead.bind(str(path))
    server = Peer(plaintext_address=f"unix:{path}", disable_tls=True,
                  combined_health_check=True, transport=transport)
    await server.start()
    try:
        assert server.plaintext_port == 1  # what grpc answers for a unix socket
        with grpc.insecure_channel(f"unix:{path}") as channel:
            assert (await ask(channel))["x-peer"] == "unix:"  # as grpc writes a unix peer
    finally:
        await server.stop(0)
    assert not path.exists()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_tls_and_mtls_on_a_unix_socket(tmp_path: Path, certs: Certs,
                                             transport: str) -> None:
    path = tmp_path / "tls.sock"
    server = Peer(secure_address=f"unix:{path}", disable_plaintext=True,
                  combined_health_check=True, cert_chain_path=certs.cert_path,
                  private_key_path=certs.key_path, client_ca_path=certs.ca_path,
                  transport=transport)
    await server.start()
    try:
        # The server's own certificate, issued by the same CA, will do as a client's.
        creds = grpc.ssl_channel_credentials(certs.ca_pem, certs.key_pem, certs.cert_pem)
        options = [("grpc.ssl_target_name_override", "localhost")]
        with grpc.secure_channel(f"unix:{path}", creds, options) as channel:
            assert await ask(channel) == {"x-peer": "unix:", "x-identity": "localhost"}
        anonymous = grpc.ssl_channel_credentials(certs.ca_pem)
        with grpc.secure_channel(f"unix:{path}", anonymous, options) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                await ask(channel)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)
    assert not path.exists()
