"""Options: documented defaults, environment, validation with one-line errors."""

from __future__ import annotations

import logging
import os

import pytest

from calloutkit import (
    CalloutServer,
    ConfigError,
    ServerConfig,
    add_command_line_args,
    parse_address,
)


def test_documented_default_ports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./extproc/ssl_creds here
    config = ServerConfig.build()
    assert config.plaintext_address == ("0.0.0.0", 8080)
    assert config.health_check_address == ("0.0.0.0", 8000)
    assert config.secure_address is None  # no certificate at the default path


def test_default_certificate_paths_enable_tls_when_present(tmp_path, monkeypatch, certs):
    folder = tmp_path / "extproc" / "ssl_creds"
    folder.mkdir(parents=True)
    (folder / "chain.pem").write_bytes(certs.cert_pem)
    (folder / "privatekey.pem").write_bytes(certs.key_pem)
    monkeypatch.chdir(tmp_path)
    config = ServerConfig.build(default_ip="127.0.0.1")
    assert config.secure_address == ("127.0.0.1", 8443)
    assert config.cert_chain == certs.cert_pem


def test_missing_default_certificate_warns_once_and_says_how(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        ServerConfig.build()
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "TLS listener not started" in warnings[0] and "cert_chain_path" in warnings[0]


def test_explicit_unreadable_certificate_names_the_file():
    with pytest.raises(ConfigError) as error:
        ServerConfig.build(cert_chain_path="/nonexistent/chain.pem",
                           private_key_path="/nonexistent/key.pem")
    assert str(error.value) == ("cannot read certificate chain '/nonexistent/chain.pem': "
                                "No such file or directory")


def test_no_listener_at_all_is_an_error():
    with pytest.raises(ConfigError, match="no listener"):
        ServerConfig.build(disable_tls=True, disable_plaintext=True)


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)),
    ("[::1]:9000", ("::1", 9000)),
    ("localhost:0", ("localhost", 0)),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("127.0.0.1", "has no port"),
    ("127.0.0.1:http", "is not a number"),
    ("127.0.0.1:70000", "out of range"),
    ("[::1]", "has no port"),
])
def test_bad_addresses(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_address(text)


def test_ports_override_addresses_and_default_ip():
    config = ServerConfig.build(default_ip="127.0.0.2", plaintext_port=9001,
                                health_check_address=("127.0.0.3", 1), health_check_port=9002,
                                disable_tls=True)
    assert config.plaintext_address == ("127.0.0.2", 9001)
    assert config.health_check_address == ("127.0.0.3", 9002)


def test_environment_fills_only_what_the_caller_left_out():
    env = {"CALLOUTKIT_PLAINTEXT_ADDRESS": "127.0.0.1:9100", "CALLOUTKIT_DISABLE_TLS": "true",
           "CALLOUTKIT_GRACE_PERIOD": "2.5", "CALLOUTKIT_HEALTH_CHECK_PORT": "9101"}
    server = CalloutServer(health_check_port=9200, environ=env)
    assert server.config.plaintext_address == ("127.0.0.1", 9100)
    assert server.config.health_check_address == ("0.0.0.0", 9200)  # the argument wins
    assert server.config.grace_period == 2.5
    assert server.config.secure_address is None


@pytest.fixture
def environment(monkeypatch, certs):
    """Every CALLOUTKIT_* variable set the other way from the explicit arguments below."""
    for name, value in {"DISABLE_TLS": "1", "DISABLE_PLAINTEXT": "1", "REFLECTION": "1",
                        "COMBINED_HEALTH_CHECK": "1", "GRACE_PERIOD": "9",
                        "PLAINTEXT_PORT": "9100", "WORKERS": "2", "EVENT_LOOP": "uvloop",
                        "CERT_CHAIN_PATH": "/nonexistent/chain.pem",
                        "PRIVATE_KEY_PATH": "/nonexistent/key.pem"}.items():
        monkeypatch.setenv("CALLOUTKIT_" + name, value)


async def test_explicit_false_zero_and_none_win_over_the_environment(environment, certs):
    server = CalloutServer(
        address=("127.0.0.1", 0), plaintext_address=("127.0.0.1", 0),
        health_check_address=("127.0.0.1", 0), disable_tls=False, disable_plaintext=False,
        reflection=False, combined_health_check=False, grace_period=0, plaintext_port=None,
        workers=None, event_loop="asyncio", cert_chain_path=certs.cert_path,
        private_key_path=certs.key_path)
    config = server.config
    assert (config.reflection, config.grace_period, config.workers, config.event_loop) == (
        False, 0.0, 1, "asyncio")
    await server.start()
    try:
        assert server.secure_port and server.plaintext_port and server.health_check_port
        assert server.plaintext_port != 9100
    finally:
        await server.stop(0)


def test_the_environment_still_fills_what_is_not_passed(environment):
    server = CalloutServer(disable_plaintext=False, workers=1)
    config = server.config
    assert config.secure_address is None  # CALLOUTKIT_DISABLE_TLS, before any cert path
    assert config.plaintext_address == ("0.0.0.0", 9100)
    assert config.health_check_address is None
    assert (config.reflection, config.grace_period) == (True, 9.0)


def test_explicit_default_certificate_path_wins_over_the_environment(environment, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing at the default path: TLS off, not the variable's file
    server = CalloutServer(disable_tls=False, disable_plaintext=False, workers=1,
                           cert_chain_path="./extproc/ssl_creds/chain.pem",
                           private_key_path="./extproc/ssl_creds/privatekey.pem")
    assert server.config.secure_address is None


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="CALLOUTKIT_PLAINTEXT_PORT='eighty'"):
        CalloutServer(environ={"CALLOUTKIT_PLAINTEXT_PORT": "eighty",
                               "CALLOUTKIT_DISABLE_TLS": "1"})


def test_server_thread_count_sizes_the_pool_for_sync_callbacks():
    server = CalloutServer(server_thread_count=3, disable_tls=True)
    assert server.config.thread_count == 3
    assert server._pool._size == 3
    assert os.cpu_count()  # the default is derived from it


def test_event_loop_is_uvloop_when_installed_unless_asyncio_is_asked_for():
    pytest.importorskip("uvloop")
    assert CalloutServer(disable_tls=True).config.event_loop == "uvloop"
    assert CalloutServer(disable_tls=True, event_loop="asyncio").config.event_loop == "asyncio"
    server = CalloutServer(disable_tls=True, environ={"CALLOUTKIT_EVENT_LOOP": "asyncio"})
    assert server.config.event_loop == "asyncio"


def test_unknown_event_loop_is_a_one_line_error():
    with pytest.raises(ConfigError, match="event_loop must be one of auto, uvloop, asyncio"):
        CalloutServer(disable_tls=True, event_loop="trio")


def test_callback_timeout_and_drain_delay_from_arguments_variables_and_flags():
    default = CalloutServer(disable_tls=True).config
    assert (default.callback_timeout, default.drain_delay) == (10.0, 0.0)
    config = CalloutServer(disable_tls=True, callback_timeout=0.25, drain_delay=3).config
    assert (config.callback_timeout, config.drain_delay) == (0.25, 3.0)
    server = CalloutServer(disable_tls=True, environ={"CALLOUTKIT_CALLBACK_TIMEOUT": "2.5",
                                                      "CALLOUTKIT_DRAIN_DELAY": "4"})
    assert (server.config.callback_timeout, server.config.drain_delay) == (2.5, 4.0)
    assert server._pool._timeout == 2.5
    # 0 turns the limit off; the argument wins over the variable.
    server = CalloutServer(disable_tls=True, callback_timeout=0,
                           environ={"CALLOUTKIT_CALLBACK_TIMEOUT": "2.5"})
    assert server.config.callback_timeout is None and server._pool._timeout is None
    args = add_command_line_args().parse_args(["--callback_timeout", "1.5",
                                               "--drain-delay", "6"])
    assert (args.callback_timeout, args.drain_delay) == (1.5, 6.0)


@pytest.mark.parametrize(("option", "value"), [
    ("callback_timeout", -1), ("callback_timeout", float("inf")), ("drain_delay", -0.5),
    ("drain_delay", float("nan"))])
def test_bad_callback_timeout_or_drain_delay_is_a_one_line_error(option, value):
    with pytest.raises(ConfigError, match=rf"^{option} must be >= 0 seconds"):
        CalloutServer(disable_tls=True, **{option: value})


def test_bad_drain_delay_variable_names_it():
    with pytest.raises(ConfigError, match="CALLOUTKIT_DRAIN_DELAY='soon'"):
        CalloutServer(disable_tls=True, environ={"CALLOUTKIT_DRAIN_DELAY": "soon"})
