"""The calloutkit command: serve, documented flags, one-line errors with exit code 2."""

from __future__ import annotations

import os
import signal
import sys

import pytest
from conftest import read_until, run_cli, spawn, stop_process

from calloutkit import TargetError
from calloutkit._cli import add_command_line_args
from calloutkit._loader import load_target


def test_documented_flags_with_underscores_and_dashes():
    parser = add_command_line_args()
    args = parser.parse_args(["--plaintext_address", "127.0.0.1:8081", "--health-check-port",
                              "9000", "--combined_health_check", "--disable-plaintext",
                              "--port", "8444", "--secure_health_check", "--default_ip",
                              "127.0.0.1", "--cert_chain_path", "c.pem", "--private-key-path",
                              "k.pem", "--server_thread_count", "4", "--secure_address",
                              "127.0.0.1:8445", "--disable_tls"])
    assert args.plaintext_address == ("127.0.0.1", 8081)
    assert args.health_check_port == 9000
    assert args.combined_health_check and args.disable_plaintext and args.disable_tls
    assert (args.port, args.cert_chain_path, args.private_key_path) == (8444, "c.pem", "k.pem")
    assert args.server_thread_count == 4


def test_address_without_port_is_one_line_exit_2():
    result = run_cli("serve", "tests/servers/slow_server.py", "--plaintext_address",
                     "127.0.0.1")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "has no port" in result.stderr and "Traceback" not in result.stderr


def test_unreadable_certificate_is_one_line_exit_2():
    result = run_cli("serve", "tests/servers/slow_server.py", "--cert_chain_path",
                     "/nonexistent/chain.pem", "--private_key_path", "/nonexistent/key.pem",
                     "--plaintext_address", "127.0.0.1:0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "calloutkit: error: cannot read certificate chain '/nonexistent/chain.pem': "
        "No such file or directory"]


@pytest.mark.parametrize(("target", "message"), [
    ("tests/conftest.py", "defines no server class"),
    ("tests/nope.py", "no such file"),
    ("tests/servers/slow_server.py:Missing", "has no attribute 'Missing'"),
    ("calloutkit.tools:get_header", "is not a calloutkit server class"),
    ("no_such_module_xyz", "cannot import"),
])
def test_target_that_is_not_a_server(target, message):
    with pytest.raises(TargetError, match=message):
        load_target(target)


def test_target_error_on_the_command_line():
    result = run_cli("serve", "tests/conftest.py", "--plaintext_address", "127.0.0.1:0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "calloutkit: error: tests/conftest.py defines no server class (a subclass of "
        "CalloutServer, NetworkCalloutServer, TykPluginServer, ...)"]


def test_bad_environment_variable_exit_2():
    result = run_cli("serve", "tests/servers/slow_server.py",
                     env={"CALLOUTKIT_PLAINTEXT_PORT": "eighty"})
    assert result.returncode == 2
    assert "CALLOUTKIT_PLAINTEXT_PORT='eighty'" in result.stderr
    assert "Traceback" not in result.stderr


def test_load_target_forms(tmp_path):
    folder = tmp_path / "myserver"
    folder.mkdir()
    (folder / "server.py").write_text(
        "from calloutkit import CalloutServer\nclass Mine(CalloutServer):\n    pass\n")
    assert load_target(str(folder)).__name__ == "Mine"
    assert load_target(str(folder / "server.py") + ":Mine").__name__ == "Mine"
    assert load_target("tests/servers/slow_server.py").__name__ == "SlowServer"


def test_flags_win_over_environment_variables():
    process = spawn([sys.executable, "-m", "calloutkit._cli", "serve",
                     "tests/servers/slow_server.py", "--plaintext_address", "127.0.0.1:0",
                     "--combined_health_check", "--grace_period", "0.5"],
                    env={"CALLOUTKIT_GRACE_PERIOD": "7", "CALLOUTKIT_DISABLE_TLS": "1",
                         "CALLOUTKIT_PLAINTEXT_ADDRESS": "127.0.0.1:1"})
    try:
        line = read_until(process, "serving:")
        assert line.split("grpc 127.0.0.1:")[1].split()[0].rstrip(",") != "1"
        os.kill(process.pid, signal.SIGTERM)
        assert "grace 0.5s" in read_until(process, "draining:")
        assert process.wait(10) == 0
    finally:
        stop_process(process)
