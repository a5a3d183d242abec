"""Sending read/write chunks to a network callout server from the command line."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import LOOPBACK, REPO, Certs, free_port

from calloutkit import ConfigError
from calloutkit.network._send import parse_chunks
from calloutkit.network._server import NetworkCalloutServer, ProcessingResult


class Echoing(NetworkCalloutServer):
    """Upper-cases client bytes, tags upstream bytes with the tenant, closes on 'bye'."""

    async def on_read_data(self, data, end_of_stream, context):
        if data == b"bye":
            context.close_connection()
        if data == b"boom":
            raise RuntimeError("broken")
        return ProcessingResult(data.upper(), modified=True)

    async def on_write_data(self, data, end_of_stream, context):
        tenant = context.metadata.get("tenant", {}).get("name", "?")
        caller = dict(context.invocation_metadata()).get("x-caller", "?")
        context.set_dynamic_metadata("calloutkit", {"seen": len(data)})
        return ProcessingResult(f"{tenant}/{caller}:".encode() + data, modified=True)


@pytest.fixture
async def server() -> AsyncIterator[Echoing]:
    instance = Echoing(**LOOPBACK, error_policy="abort")
    await instance.start()
    yield instance
    await instance.stop(1)


def run_send(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "calloutkit", "send", "--l4", *args],
                          input=stdin, capture_output=True, text=True, timeout=60, cwd=REPO,
                          env=dict(os.environ), start_new_session=True)


async def send(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_send, *args, stdin=stdin)


def replies(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


async def test_yaml_file_chunks_and_replies(server, tmp_path):
    path = tmp_path / "connection.yaml"
    path.write_text(
        "metadata: {tenant: {name: acme}}\n"
        "messages:\n"
        "  - read_data: hello\n"
        "  - write_data: \"+OK\\r\\n\"\n"
        "  - write_data: {base64: AP8=}\n"
        "  - read_data: bye\n"
        "  - read_data: never sent\n")
    result = await send(str(path), "--address", f"127.0.0.1:{server.plaintext_port}",
                        "--metadata", "x-caller=cli")
    assert result.returncode == 0, result.stderr
    out = replies(result)
    assert out[0] == {"read_data": {"data": "HELLO", "end_of_stream": False},
                      "data_processing_status": "MODIFIED", "connection_status": "CONTINUE"}
    assert out[1]["write_data"] == {"data": "acme/cli:+OK\r\n", "end_of_stream": False}
    assert out[1]["dynamic_metadata"] == {"calloutkit": {"seen": 5.0}}
    assert out[2]["write_data"]["data_base64"] == "YWNtZS9jbGk6AP8="  # b"acme/cli:\x00\xff"
    assert out[3]["connection_status"] == "CLOSE"
    assert len(out) == 4  # nothing is sent after the connection is closed


async def test_json_on_stdin(server):
    chunks = json.dumps([{"read": "a"}, {"read": "", "end_of_stream": True}])
    result = await send("-", "--address", f"127.0.0.1:{server.plaintext_port}", stdin=chunks)
    assert result.returncode == 0, result.stderr
    out = replies(result)
    assert [o["read_data"] for o in out] == [{"data": "A", "end_of_stream": False},
                                             {"data": "", "end_of_stream": True}]


async def test_proto_json_and_pretty(server):
    result = await send("--address", f"127.0.0.1:{server.plaintext_port}", "--proto-json",
                        "--pretty", stdin='[{"read": "a"}]')
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("{\n  ")
    assert json.loads(result.stdout) == {"read_data": {"data": "QQ=="},
                                         "data_processing_status": "MODIFIED"}


async def test_grpc_error_exits_non_zero_with_status_and_details(server, tmp_path):
    path = tmp_path / "boom.json"
    path.write_text('[{"read": "ok"}, {"read": "boom"}]')
    result = await send(str(path), "--address", f"127.0.0.1:{server.plaintext_port}")
    assert result.returncode == 1
    assert len(replies(result)) == 1  # the reply before the error was printed
    assert result.stderr.strip() == "calloutkit: error: gRPC INTERNAL: callout failed"


@pytest.mark.no_server
async def test_unreachable_server(tmp_path):
    path = tmp_path / "one.json"
    path.write_text('[{"read": "x"}]')
    result = await send(str(path), "--address", f"127.0.0.1:{free_port()}", "--timeout", "5")
    assert result.returncode == 1
    assert result.stderr.startswith("calloutkit: error: gRPC UNAVAILABLE")


async def test_tls_with_a_ca(certs: Certs, tmp_path):
    instance = Echoing(secure_address=("127.0.0.1", 0), disable_plaintext=True,
                       combined_health_check=True, cert_chain_path=certs.cert_path,
                       private_key_path=certs.key_path)
    await instance.start()
    try:
        path = tmp_path / "one.json"
        path.write_text('[{"read": "secure"}]')
        result = await send(str(path), "--address", f"127.0.0.1:{instance.secure_port}",
                            "--ca", certs.ca_path, "--authority", "localhost")
        assert result.returncode == 0, result.stderr
        assert replies(result)[0]["read_data"]["data"] == "SECURE"
    finally:
        await instance.stop(1)


@pytest.mark.no_server
@pytest.mark.parametrize(("content", "message"), [
    ("[{read: x", "not valid JSON or YAML"),
    ("[]", "expected a non-empty list of messages"),
    ('{"chunk": []}', "unknown key 'chunk'"),
    ('[{"read": "a", "write": "b"}]', "message 1: needs exactly one of read_data, write_data"),
    ('[{"read": "a"}, {"reed": "b"}]', "message 2: needs exactly one of read_data"),
    ('[{"read_data": "a", "eos": true}]', "message 1: unknown key 'eos'"),
    ('[{"read_data": 5}]', "message 1: read_data: expected text or {base64: ...}, got int"),
    ('[{"read_data": {"base64": "***"}}]', "message 1: read_data: base64 is not valid base64"),
    ('[{"read": "a", "end_of_stream": "yes"}]', "end_of_stream must be true or false"),
    ('{"metadata": {"ns": 1}, "messages": [{"read": "a"}]}', "metadata: expected {namespace"),
    ("- just text", "message 1: expected a mapping"),
])
def test_malformed_descriptions_say_what_is_wrong(content: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_chunks(content, "conn.yaml")
    assert message in str(error.value)
    assert str(error.value).startswith("conn.yaml")
    assert "\n" not in str(error.value)


@pytest.mark.no_server
def test_malformed_file_on_the_command_line_is_one_line_exit_2(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("messages: [{read_data: a}, {write_data: [1]}]\n")
    result = run_send(str(path))
    assert result.returncode == 2
    assert result.stderr == (f"calloutkit: error: {path}: message 2: write_data: expected "
                             "text or {base64: ...}, got list\n")
    missing = run_send(str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert "No such file or directory" in missing.stderr
    assert missing.stderr.count("\n") == 1



async def test_the_block_command_example_file(tmp_path):
    from calloutkit.cli._loader import load_target

    server = load_target(os.path.join(REPO, "examples", "l4_block_command"))(**LOOPBACK)
    await server.start()
    try:
        result = await send(os.path.join("examples", "l4_block_command", "connection.yaml"),
                            "--address", f"127.0.0.1:{server.plaintext_port}")
    finally:
        await server.stop(1)
    assert result.returncode == 0, result.stderr
    assert [r["connection_status"] for r in replies(result)] == ["CONTINUE", "CONTINUE",
                                                                 "CLOSE"]
    assert replies(result)[1]["write_data"]["data"] == "+PONG\r\n"
