"""``calloutkit send --authz`` against a running AuthzServer, as a real subprocess."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from conftest import LOOPBACK, REPO, free_port, running

from calloutkit import AuthzServer, allow_request, deny_request
from calloutkit.authz._send import parse_checks


class Echo(AuthzServer):
    def on_check(self, request, context):
        if request.headers.get("x-api-key") != "k1":
            return deny_request(401, "no\n", [("www-authenticate", "ApiKey")])
        return allow_request(headers_to_set=[
            ("x-seen", f"{request.method} {request.path} {request.source_address} "
                       f"{request.body.decode()} {request.metadata}")])


def send(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "calloutkit", "send", *args],
                          input=stdin, capture_output=True, text=True, timeout=60, cwd=REPO,
                          start_new_session=True)


async def test_each_described_check_prints_its_reply() -> None:
    description = """
- method: POST
  path: /orders
  headers: {X-Api-Key: k1}
  body: hi
  source: 10.0.0.5:4000
  metadata: {policy: {tier: gold}}
- path: /
"""
    async with running(Echo(**LOOPBACK)) as server:
        result = await asyncio.to_thread(
            send, "--authz", "--address", f"127.0.0.1:{server.plaintext_port}", stdin=description)
    assert result.returncode == 0, result.stderr
    allowed, denied = [json.loads(line) for line in result.stdout.splitlines()]
    assert allowed["allowed"] is True
    assert allowed["ok_response"]["headers"][0]["header"] == {
        "key": "x-seen", "value": "POST /orders 10.0.0.5 hi {'policy': {'tier': 'gold'}}"}
    assert denied["allowed"] is False
    assert denied["denied_response"]["status"] == {"code": "Unauthorized"}
    assert denied["denied_response"]["body"] == "no\n"


async def test_the_examples_check_files_run() -> None:
    from calloutkit.cli._loader import load_target

    server = load_target(f"{REPO}/examples/authz_block_ip")(**LOOPBACK)
    async with running(server):
        result = await asyncio.to_thread(
            send, "--authz", "examples/authz_block_ip/check.yaml", "--address",
            f"127.0.0.1:{server.plaintext_port}")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["allowed"] for line in result.stdout.splitlines()] == [True, False]


@pytest.mark.no_server
def test_bad_descriptions_are_one_line_and_exit_2(tmp_path) -> None:
    for text, message in (("path: 3", "path must be text"),
                          ("{verb: GET}", "unknown key 'verb'"),
                          ("source: nowhere", "source"),
                          ("headers: [a]", "headers: expected a mapping")):
        result = send("--authz", stdin=text)
        assert result.returncode == 2, (text, result.stderr)
        assert message in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    result = send("--authz", "--l4", stdin="{}")
    assert result.returncode == 2 and "not allowed with" in result.stderr


@pytest.mark.no_server
def test_an_unreachable_server_is_exit_1() -> None:
    result = send("--authz", "--address", f"127.0.0.1:{free_port()}", "--timeout", "2",
                  stdin="{}")
    assert result.returncode == 1
    assert result.stderr.startswith("calloutkit: error: gRPC UNAVAILABLE")


@pytest.mark.no_server
def test_parse_checks_reads_one_request_or_a_list() -> None:
    [one] = parse_checks("{path: /a, body: {base64: aGk=}}")
    assert one.attributes.request.http.raw_body == b"hi"
    assert len(parse_checks("[{}, {}, {}]")) == 3
