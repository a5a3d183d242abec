"""``calloutkit send``: a described stream, sent to a real server over gRPC (plaintext or TLS)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import LOOPBACK, REPO, Certs
from test_examples_harness import EXAMPLES, ServerLoop, load_example

from calloutkit import CalloutServer, ConfigError
from calloutkit.client._play import read_source
from calloutkit.extproc._send import parse_stream, reply_to_dict, send_stream

BASIC_STREAM = EXAMPLES / "basic" / "stream.yaml"


def send_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "calloutkit", "send", *args],
                          input=stdin, capture_output=True, text=True, timeout=60, cwd=REPO,
                          start_new_session=True, env=os.environ.copy())


class Refuser(CalloutServer):
    """Ends every stream with PERMISSION_DENIED."""

    def on_request_headers(self, headers: Any, context: Any) -> None:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "no entry for you")


@pytest.fixture(scope="module")
def servers(server_transport: str | None, certs: Certs) -> Iterator[dict[str, CalloutServer]]:
    """basic (plaintext and TLS), redirect and a refusing server, on a background loop."""
    loop = ServerLoop()
    running = {
        "basic": load_example("basic")(**LOOPBACK),
        "basic_tls": load_example("basic")(secure_address=("127.0.0.1", 0),
                                           cert_chain_path=certs.cert_path,
                                           private_key_path=certs.key_path,
                                           disable_plaintext=True, combined_health_check=True),
        "redirect": load_example("redirect")(**LOOPBACK),
        "refuser": Refuser(**LOOPBACK),
    }
    try:
        for server in running.values():
            loop.run(server.start())
        yield running
    finally:
        for server in running.values():
            loop.run(server.stop(grace=1))
        loop.close()


def address(server: CalloutServer, tls: bool = False) -> str:
    return f"127.0.0.1:{server.secure_port if tls else server.plaintext_port}"


def last_line(stderr: str) -> str:
    """The command's own message (gRPC's C core may log lines of its own before it)."""
    return stderr.strip().splitlines()[-1]


def replies(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def header_set(reply: dict[str, Any], phase: str) -> dict[str, str]:
    options = reply[phase]["response"]["header_mutation"].get("set_headers", [])
    return {o["header"]["key"]: o["header"]["value"] for o in options}


# -- against the basic example -------------------------------------------------------------

def test_send_prints_the_mutations_of_the_basic_example(
        servers: dict[str, CalloutServer]) -> None:
    result = send_cli(str(BASIC_STREAM), "--address", address(servers["basic"]))
    assert result.returncode == 0, result.stderr
    request_headers, request_body, response_headers, response_body = replies(result.stdout)

    assert header_set(request_headers, "request_headers") == {
        ":authority": "service.calloutkit.example", ":path": "/", "header-request": "request"}
    assert request_headers["request_headers"]["response"]["header_mutation"][
        "remove_headers"] == ["foo"]
    assert request_headers["request_headers"]["response"]["clear_route_cache"] is True

    assert request_body["request_body"]["response"]["body_mutation"] == {"body": "replaced-body"}
    assert header_set(request_body, "request_body") == {"content-length": "13"}
    assert header_set(response_headers, "response_headers") == {"hello": "calloutkit"}
    assert response_body["response_body"]["response"]["body_mutation"] == {"clear_body": True}


def test_send_reads_json_from_stdin_and_can_print_protobuf_json(
        servers: dict[str, CalloutServer]) -> None:
    stream = json.dumps([{"request_headers": {":path": "/", ":method": "GET"}},
                         {"response_headers": {":status": 200}}])
    result = send_cli("--address", address(servers["basic"]), "--proto-json", stdin=stream)
    assert result.returncode == 0, result.stderr
    first, second = replies(result.stdout)
    option = first["request_headers"]["response"]["header_mutation"]["set_headers"][0]
    assert option["header"] == {"key": ":authority",
                                "raw_value": "c2VydmljZS5jYWxsb3V0a2l0LmV4YW1wbGU="}
    assert second["response_headers"]["response"]["header_mutation"]["set_headers"][0][
        "header"]["key"] == "hello"


def test_send_over_tls_with_a_ca_file(servers: dict[str, CalloutServer], certs: Certs) -> None:
    server = servers["basic_tls"]
    ok = send_cli(str(BASIC_STREAM), "--address", address(server, tls=True),
                  "--ca-file", certs.ca_path)
    assert ok.returncode == 0, ok.stderr
    assert len(replies(ok.stdout)) == 4

    unverified = send_cli(str(BASIC_STREAM), "--address", address(server, tls=True), "--tls",
                          "--timeout", "5")  # system roots do not know the test CA
    assert unverified.returncode == 1
    assert last_line(unverified.stderr).startswith("calloutkit: error: gRPC UNAVAILABLE")


# -- errors --------------------------------------------------------------------------------

def test_send_reports_a_grpc_error_with_status_and_details(
        servers: dict[str, CalloutServer]) -> None:
    result = send_cli(str(BASIC_STREAM), "--address", address(servers["refuser"]))
    assert result.returncode == 1
    assert result.stdout == ""
    assert last_line(result.stderr) == "calloutkit: error: gRPC PERMISSION_DENIED: no entry for you"


@pytest.mark.no_server
def test_send_reports_an_unreachable_server() -> None:
    result = send_cli(str(BASIC_STREAM), "--address", "127.0.0.1:1", "--timeout", "5")
    assert result.returncode == 1
    assert last_line(result.stderr).startswith("calloutkit: error: gRPC UNAVAILABLE:")


def test_send_stops_after_an_immediate_response(servers: dict[str, CalloutServer]) -> None:
    result = send_cli(str(BASIC_STREAM), "--address", address(servers["redirect"]))
    assert result.returncode == 0, result.stderr
    (only,) = replies(result.stdout)
    immediate = only["immediate_response"]
    assert immediate["status"] == {"code": "MovedPermanently"}
    assert {"header": {"key": "location", "value": "https://www.calloutkit.example/upload"}} \
        in immediate["headers"]["set_headers"]


@pytest.mark.no_server
def test_a_malformed_description_gives_one_line_naming_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "stream.yaml"
    bad.write_text("messages:\n  - request_headers: {':path': /}\n  - request_bod: hi\n")
    result = send_cli(str(bad), "--address", "127.0.0.1:1")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"calloutkit: error: {bad}: messages[1]: needs exactly "
                                    "one phase")
    assert "did you mean request_body?" in result.stderr


@pytest.mark.no_server
def test_l4_messages_without_l4_suggest_it() -> None:
    path = "examples/l4_block_command/connection.yaml"
    result = send_cli(path, "--address", "127.0.0.1:1")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"calloutkit: error: {path}: messages[0]: ")
    assert "is a network (L4) message; send it with --l4" in result.stderr


@pytest.mark.no_server
@pytest.mark.parametrize(("text", "problem"), [
    ("messages: [", "line 1: not valid JSON or YAML"),
    ("42", "expected a list of messages or a mapping with 'messages', got int"),
    ("{}", "'messages' must be a non-empty list"),
    ("{messages: [], extra: 1}", "unknown key 'extra'"),
    ("[request_headers]", "messages[0]: expected a mapping like {request_headers: ...}, got str"),
    ("[{request_headers: {a: b}, response_headers: {}}]", "messages[0]: needs exactly one phase"),
    ("[{request_headers: {a: b}, color: red}]", "messages[0]: unknown key 'color'"),
    ("[{request_headers: [a, b]}]", "request_headers: expected a mapping of name: value"),
    ("[{request_headers: {a: [1]}}]", "value of 'a' must be text or a number, got list"),
    ("[{request_headers: {'': b}}]", "header name '' is not a non-empty string"),
    ("[{request_body: {base64: '***'}}]", "base64 is not valid base64"),
    ("[{request_body: 12}]", "expected text or {base64: ...}, got int"),
    ("[{request_body: hi, end_of_stream: maybe}]", "end_of_stream must be true or false"),
    ("[{request_trailers: {a: b}, end_of_stream: true}]", "trailers always end the stream"),
    ("{messages: [{request_headers: {}}], protocol_config: {request_body_mode: SOMETIMES}}",
     "Invalid enum value SOMETIMES"),
    ("{messages: [{request_headers: {}}], metadata: {ns: 1}}",
     "metadata: expected {namespace: {key: value}}"),
    ("{messages: [{request_headers: {}}], observability_mode: 1}",
     "observability_mode must be true or false"),
    ("[{processing_request: {request_headers: {nope: 1}}}]", "processing_request:"),
    ("[{write: hi}]", "messages[0]: write is a network (L4) message; send it with --l4"),
    ("{chunks: [{read_data: hi}]}", "'chunks' belongs to a network (L4) description; send it "
     "with --l4"),
])
def test_malformed_descriptions_are_rejected(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_stream(text, "stream.yaml")
    message = str(caught.value)
    assert message.startswith("stream.yaml:")
    assert problem in message
    assert "\n" not in message


# -- what the description becomes ----------------------------------------------------------

@pytest.mark.no_server
def test_end_of_stream_and_body_modes_are_worked_out_as_envoy_sets_them() -> None:
    description = parse_stream("""
        messages:
          - request_headers: {":method": POST}
          - request_body: part one
          - request_body: {base64: AAEC}
          - request_trailers: {x-sum: "3"}
          - response_headers: [[":status", "200"], [set-cookie, a=1], [set-cookie, b=2]]
          - response_body: done
    """)
    requests = description.requests
    assert requests[0].protocol_config.request_body_mode == 1  # STREAMED: two chunks
    assert requests[0].protocol_config.response_body_mode == 2  # BUFFERED: one body
    assert [r.WhichOneof("request") for r in requests] == [
        "request_headers", "request_body", "request_body", "request_trailers",
        "response_headers", "response_body"]
    assert not requests[0].request_headers.end_of_stream
    assert not requests[1].request_body.end_of_stream
    assert not requests[2].request_body.end_of_stream  # trailers follow
    assert requests[2].request_body.body == b"\x00\x01\x02"
    assert not requests[4].response_headers.end_of_stream
    assert [h.raw_value for h in requests[4].response_headers.headers.headers] == [
        b"200", b"a=1", b"b=2"]
    assert requests[5].response_body.end_of_stream
    assert all(not r.HasField("protocol_config") for r in requests[1:])


@pytest.mark.no_server
def test_metadata_attributes_and_explicit_settings_are_kept() -> None:
    description = parse_stream(json.dumps({
        "protocol_config": {"request_body_mode": "FULL_DUPLEX_STREAMED"},
        "metadata": {"tenant.ns": {"name": "acme"}},
        "attributes": {"envoy.filters.http.ext_proc": {"request.path": "/x"}},
        "messages": [{"request_headers": {":path": "/x"}, "end_of_stream": False},
                     {"request_body": "a", "end_of_stream": True}]}))
    first, second = description.requests
    assert first.protocol_config.request_body_mode == 4
    assert not first.request_headers.end_of_stream
    for request in (first, second):
        assert request.metadata_context.filter_metadata["tenant.ns"]["name"] == "acme"
    assert first.attributes["envoy.filters.http.ext_proc"]["request.path"] == "/x"
    assert not second.attributes


@pytest.mark.no_server
def test_stdin_is_read_for_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("[{request_headers: {}}]"))
    assert read_source("-") == ("[{request_headers: {}}]", "<stdin>")
    with pytest.raises(ConfigError, match="cannot read /no/such/file"):
        read_source("/no/such/file")


@pytest.mark.no_server
def test_bytes_that_are_not_text_stay_base64() -> None:
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    reply = pb.ProcessingResponse()
    reply.request_body.response.body_mutation.body = b"\xff\xfe"
    assert reply_to_dict(reply)["request_body"]["response"]["body_mutation"] == {
        "body_base64": "//4="}


async def test_observability_mode_sends_without_waiting_and_prints_the_replies() -> None:
    server = load_example("add_header")(**LOOPBACK)
    await server.start()
    try:
        out, err = io.StringIO(), io.StringIO()
        description = parse_stream(
            "{observability_mode: true, messages: [{request_headers: {}}, "
            "{response_headers: {':status': '200'}}]}")
        code = await send_stream(f"127.0.0.1:{server.plaintext_port}", description,
                                 out=out, err=err)
    finally:
        await server.stop(grace=1)
    # the server answers as usual (Envoy ignores those answers); send prints them
    replies = [json.loads(line) for line in out.getvalue().splitlines()]
    assert (code, err.getvalue()) == (0, "")
    assert [next(iter(r)) for r in replies] == ["request_headers", "response_headers"]
    changed = [o["header"]["key"]
               for o in replies[1]["response_headers"]["response"]["header_mutation"][
                   "set_headers"]]
    assert changed == ["header-response"]
