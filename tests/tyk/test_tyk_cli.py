"""``calloutkit tyk dispatch`` and ``dispatch-event``; ``calloutkit serve`` of a Tyk example."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, read_until, run_cli, spawn, stop_process
from google.protobuf import json_format

from calloutkit.cli._main import main
from calloutkit.tyk import EventHandler, GatewayEvent, Object, Plugin, PluginCall, TykPluginServer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PETSTORE = EXAMPLES / "tyk_logging" / "petstore_response.json"


def tag(call: PluginCall) -> None:
    call.request.set_header("X-Seen-Path", call.request.path)


def shout(call: PluginCall) -> None:
    call.response.body = call.response.text.upper()


class CliTarget(TykPluginServer):
    plugins = [Plugin("MyPreRequestPlugin", tag, hook="pre"),
               Plugin("Shout", shout, hook="response")]


@pytest.fixture
async def target() -> AsyncIterator[tuple[str, list[GatewayEvent]]]:
    events: list[GatewayEvent] = []
    server = CliTarget(plaintext_address=("127.0.0.1", 0), combined_health_check=True,
                       events=[EventHandler(events.append)])
    await server.start()
    yield f"127.0.0.1:{server.plaintext_port}", events
    await server.stop(1)


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``calloutkit ARGV`` in a thread (its gRPC client blocks) while the server serves."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_dispatch_from_flags_builds_the_object_as_the_gateway_does(
        target: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    address, _ = target
    body = tmp_path / "body.bin"
    body.write_bytes(b"\x00\xffdata")
    code, out, err = await cli(
        capsys, "tyk", "dispatch", "--target", f"tcp://{address}", "--hook", "pre",
        "--name", "MyPreRequestPlugin", "--api-id", "ce65", "--org-id", "5e9d",
        "--method", "POST", "--url", "/pet/findByStatus?status=available",
        "--header", "Accept: */*", "--header", "accept: second", "--body", f"@{body}")
    assert code == 0, err
    returned = json.loads(out)
    assert returned["hookType"] == "Pre" and returned["hookName"] == "MyPreRequestPlugin"
    request = returned["request"]
    assert request["setHeaders"] == {"X-Seen-Path": "/pet/findByStatus"}
    assert request["headers"] == {"Accept": "*/*", "Host": "localhost:8080"}
    assert request["params"] == {"status": "available"}
    assert request["returnOverrides"] == {"responseCode": -1}
    assert (request["method"], request["scheme"]) == ("POST", "http")
    assert base64.b64decode(request["rawBody"]) == b"\x00\xffdata"
    assert "body" not in request  # not UTF-8: the gateway sends raw_body only
    assert returned["spec"] == {"APIID": "ce65", "OrgID": "5e9d",
                                "bundle_hash": "d41d8cd98f00b204e9800998ecf8427e"}


async def test_dispatch_the_seed_payload_from_a_file_and_from_stdin(
        target: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, _ = target
    sent = json_format.Parse(PETSTORE.read_text(), Object())
    code, out, err = await cli(capsys, "tyk", "dispatch", "-t", address, "--object",
                               str(PETSTORE))
    assert code == 0, err
    unchanged = Object()
    unchanged.CopyFrom(sent)
    unchanged.request.ClearField("body")
    unchanged.response.ClearField("body")  # the gateway reads raw_body only
    assert json_format.Parse(out, Object()) == unchanged  # nobody registered: back unchanged
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(PETSTORE.read_bytes())))
    code, out, err = await cli(capsys, "tyk", "dispatch", "-t", address, "--object", "-",
                               "--name", "Shout")
    assert code == 0, err
    returned = json_format.Parse(out, Object())
    assert returned.response.raw_body == sent.response.raw_body.upper()
    assert returned.response.headers["Content-Length"] == str(len(sent.response.raw_body))


async def test_dispatch_a_response_hook_from_flags(
        target: Any, capsys: pytest.CaptureFixture[str]) -> None:
    address, _ = target
    code, out, err = await cli(
        capsys, "tyk", "dispatch", "-t", address, "--hook", "response", "--name", "Shout",
        "--url", "/x", "--status", "201", "--response-header", "Content-Type: text/plain",
        "--response-header", "Content-Length: 5", "--response-body", "hello")
    assert code == 0, err
    response = json_format.Parse(out, Object()).response
    assert (response.status_code, response.raw_body) == (201, b"HELLO")
    assert dict(response.headers) == {"Content-Type": "text/plain", "Content-Length": "5"}


async def test_dispatch_event_from_flags_and_from_a_payload(
        target: Any, capsys: pytest.CaptureFixture[str]) -> None:
    address, events = target
    code, out, err = await cli(
        capsys, "tyk", "dispatch-event", "-t", address, "--type", "AuthFailure",
        "--handler-name", "audit", "--api-id", "pets", "--meta", "Key=k1", "--meta", "Path=/p")
    assert (code, out.strip()) == (0, "{}"), err
    payload = json.dumps({"message": {"Type": "HostDown", "Meta": {}}, "spec": {"APIID": "x"}})
    code, out, err = await cli(capsys, "tyk", "dispatch-event", "-t", address,
                               "--payload", payload)
    assert code == 0, err
    assert [(e.type, e.handler_name, e.api_id, dict(e.meta)) for e in events] == [
        ("AuthFailure", "audit", "pets", {"Key": "k1", "Path": "/p"}), ("HostDown", "", "x", {})]
    assert events[0].timestamp.endswith(" +0000 UTC")


async def test_a_malformed_payload_is_refused_locally_or_reported_by_the_server(
        target: Any, capsys: pytest.CaptureFixture[str]) -> None:
    address, events = target
    code, _, err = await cli(capsys, "tyk", "dispatch-event", "-t", address,
                             "--payload", "{nope")
    assert code == 2 and "--payload: not JSON" in err and "--no-check" in err
    code, _, err = await cli(capsys, "tyk", "dispatch-event", "-t", address,
                             "--payload", "{nope", "--no-check")
    assert code == 1
    assert "DispatchEvent failed: INVALID_ARGUMENT: plugin server: malformed event" in err
    assert events == []


@pytest.mark.no_server
@pytest.mark.parametrize(("argv", "message"), [
    (["--name", "x", "--header", "nocolon"], "--header 'nocolon': expected NAME:VALUE"),
    (["--name", "x", "--hook", "prequel"], "--hook: unknown hook 'prequel'"),
    ([], "give --name"),
    (["--name", "x", "--status", "200"], "need --hook response"),
    (["--object", str(PETSTORE), "--url", "/"], "--url cannot be combined with --object"),
    (["--object", '{"hookTyp": 1}'], "--object: not a coprocess.Object in JSON"),
    (["--object", "/no/such.json"], "--object: cannot read '/no/such.json'"),
    (["--name", "x", "--body", "@/no/such"], "--body: cannot read '/no/such'"),
    (["--name", "x", "--config-data", "{bad"], "--config-data: not JSON"),
])
def test_bad_input_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str],
                                          message: str) -> None:
    code = main(["tyk", "dispatch", "-t", "127.0.0.1:1", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1


@pytest.mark.no_server
def test_an_unreachable_server_exits_1_with_the_status(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["tyk", "dispatch", "-t", f"127.0.0.1:{free_port()}", "--name", "x",
                 "--timeout", "10"])
    assert code == 1
    assert "calloutkit: error: Dispatch failed: UNAVAILABLE" in capsys.readouterr().err


def test_serve_runs_an_example_and_dispatch_talks_to_it() -> None:
    port = free_port()
    process = spawn([sys.executable, "-m", "calloutkit", "serve",
                     str(EXAMPLES / "tyk_logging"), "--plaintext_port", str(port),
                     "--combined_health_check"])
    try:
        line = read_until(process, "serving")
        assert f"LoggingPlugins serving: grpc 0.0.0.0:{port}" in line
        result = run_cli("tyk", "dispatch", "--target", f"tcp://127.0.0.1:{port}",
                         "--object", str(PETSTORE))
        assert result.returncode == 0, result.stderr
        sent = json_format.Parse(PETSTORE.read_text(), Object())
        sent.request.ClearField("body")
        sent.response.ClearField("body")  # the gateway reads raw_body only
        assert json_format.Parse(result.stdout, Object()) == sent
        logged = read_until(process, "Response plugin 'MyResponsePlugin'")
        assert "ce6528c0af7b43206b9cf736a5e5d1b4" in logged
    finally:
        stop_process(process)


@pytest.mark.parametrize("command", [["dispatch", "--name", "x"],
                                     ["dispatch-event", "--type", "AuthFailure"]])
@pytest.mark.parametrize("target", ["127.0.0.1", "tcp://localhost"])
def test_a_target_without_a_port_is_one_line_exit_2(command: list[str], target: str) -> None:
    # gRPC alone would dial port 443 and report UNAVAILABLE after the timeout.
    result = run_cli("tyk", command[0], "--target", target, *command[1:], timeout=30)
    assert result.returncode == 2
    host = target.removeprefix("tcp://")
    assert result.stderr.splitlines() == [
        f"calloutkit: error: --target: address {host!r} has no port (expected HOST:PORT)"]


@pytest.mark.no_server
@pytest.mark.parametrize("command", [["tyk"], ["tyk", "dispatch"], ["tyk", "dispatch-event"]])
def test_help_is_plain_text_without_rest_markup(command: list[str]) -> None:
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"usage: calloutkit {' '.join(command)}" in result.stdout
    for markup in ("``", ":class:", ":func:", ":meth:", "::\n", ".. "):
        assert markup not in result.stdout, f"{markup!r} in:\n{result.stdout}"
    if command == ["tyk"]:
        assert "calloutkit tyk dispatch --object" in result.stdout  # the examples stay
