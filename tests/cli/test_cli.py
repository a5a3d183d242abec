"""The calloutkit command: serve, documented flags, one-line errors with exit code 2."""

from __future__ import annotations

import os
import signal
import socket
import sys

import pytest
from conftest import read_until, run_cli, spawn, stop_process

from calloutkit import TargetError
from calloutkit.cli._loader import load_target
from calloutkit.cli._main import add_command_line_args

# The console script, as users run it (``python -m calloutkit`` puts the current folder
# on sys.path by itself).
CALLOUTKIT = os.path.join(os.path.dirname(sys.executable), "calloutkit")
LOOPBACK_FLAGS = ["--plaintext_address", "127.0.0.1:0", "--disable_tls", "--combined_health_check"]


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


def test_module_target_from_the_current_folder(tmp_path):
    """``calloutkit serve server`` with server.py in the current folder, as ``python -m server``
    would find it; the console script (not ``python -m``, which adds the folder itself)."""
    (tmp_path / "server.py").write_text(
        "from calloutkit import CalloutServer\nclass Mine(CalloutServer):\n    pass\n")
    process = spawn([CALLOUTKIT, "serve", "server", *LOOPBACK_FLAGS], cwd=str(tmp_path))
    try:
        assert "Mine serving: grpc 127.0.0.1:" in read_until(process, "serving:")
    finally:
        stop_process(process)


LOGGING_SERVER = """\
import logging
from calloutkit import CalloutServer, ConfigError

class Server(CalloutServer):
    def __init__(self, **kwargs):
        logging.getLogger(__name__).debug("built at debug level")
        raise ConfigError("stopping here")
"""


@pytest.mark.parametrize(("before", "after", "shown"), [
    ([], [], False),
    (["--log-level", "DEBUG"], [], True),
    ([], ["--log-level", "DEBUG"], True),
    ([], ["--log-level", "debug"], True),
    (["--log-level", "DEBUG"], ["--log-level", "INFO"], False),
])
def test_log_level_before_or_after_the_subcommand(tmp_path, before, after, shown):
    (tmp_path / "server.py").write_text(LOGGING_SERVER)
    result = run_cli(*before, "serve", "server.py", *after, cwd=str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "calloutkit: error: stopping here"
    assert ("built at debug level" in result.stderr) is shown


def test_bad_log_level_after_the_subcommand_exit_2():
    result = run_cli("serve", "tests/servers/slow_server.py", "--log-level", "LOUD")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "--log-level: invalid choice: 'LOUD'" in result.stderr


def test_bad_log_level_variable_exit_2():
    result = run_cli("serve", "tests/servers/slow_server.py", env={"CALLOUTKIT_LOG_LEVEL": "loud"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "calloutkit: error: CALLOUTKIT_LOG_LEVEL='loud': expected DEBUG, INFO, WARNING or ERROR"]


def test_server_file_that_cannot_import(tmp_path):
    """One line naming the file and the error, after the traceback of the user's frames."""
    (tmp_path / "server.py").write_text("import helper\n")
    (tmp_path / "helper.py").write_text("VALUE = 1\nimport does_not_exist_xyz\n")
    for target, named in (("server.py", str(tmp_path / "server.py")), ("server", "server")):
        result = run_cli("serve", target, cwd=str(tmp_path))
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert lines[-1] == (f"calloutkit: error: cannot import {named}: "
                             "ModuleNotFoundError: No module named 'does_not_exist_xyz'")
        assert lines[:-1] == [
            "Traceback (most recent call last):",
            f'  File "{tmp_path / "server.py"}", line 1, in <module>',
            "    import helper",
            f'  File "{tmp_path / "helper.py"}", line 2, in <module>',
            "    import does_not_exist_xyz",
        ]


def test_server_file_that_raises_while_imported(tmp_path):
    (tmp_path / "server.py").write_text("settings = {}\nPORT = settings['port']\n")
    result = run_cli("serve", "server.py", cwd=str(tmp_path))
    assert result.returncode == 2
    # no frame of calloutkit's own (the folder the test runs in may be named anything)
    stderr = result.stderr.replace(str(tmp_path), "<tmp>")
    assert "calloutkit" not in stderr.replace("calloutkit: error:", "")
    assert "importlib" not in stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"calloutkit: error: cannot import {tmp_path / 'server.py'}: KeyError: 'port'")


@pytest.mark.parametrize("transport", ["grpcio", "native"])
@pytest.mark.parametrize("listening", [False, True], ids=["bound", "listening"])
def test_busy_port_is_one_line_exit_2(listening, transport):
    """Without gRPC core's own log line (``E... add_port.cc ...``) before ours."""
    with socket.socket() as busy:
        if listening:  # as another server holds it
            busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        if listening:
            busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "tests/servers/slow_server.py", "--plaintext_address",
                         f"127.0.0.1:{port}", "--disable_tls", "--combined_health_check",
                         "--transport", transport)
    assert result.returncode == 2
    assert "add_port" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"calloutkit: error: cannot bind plaintext listener 127.0.0.1:{port}: "
        "Address already in use"]



def test_syntax_error_names_the_file_it_is_in(tmp_path):
    (tmp_path / "server.py").write_text("import helper\n")
    (tmp_path / "helper.py").write_text("VALUE = (\n")
    result = run_cli("serve", "server.py", cwd=str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"calloutkit: error: {tmp_path / 'helper.py'}:1: syntax error: '(' was never closed"]


def test_flags_win_over_environment_variables():
    process = spawn([sys.executable, "-m", "calloutkit", "serve",
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


@pytest.mark.parametrize("command", [[], ["serve"], ["send"], ["demo"], ["proxy"], ["tyk"],
                                     ["tyk", "dispatch"], ["tyk", "dispatch-event"]])
def test_every_help_is_plain_text(command: list[str]) -> None:
    """Help comes from text written for a terminal, never from a module's reST docstring."""
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    for markup in ("``", ":class:", ":func:", ":meth:", "::\n", ".. "):
        assert markup not in result.stdout, f"{markup!r} in:\n{result.stdout}"
