"""Server options: resolved and validated once, then frozen.

`ServerConfig.build` takes the constructor options of the documented callout API (`address`,
`plaintext_port`, `cert_chain_path`, ...) and turns them into concrete listener addresses and
TLS material. Every check that can fail happens here, at construction, with a one-line
`ConfigError` naming the option; nothing is read from the environment or the disk later.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import importlib.util
import logging
import math
import os
from collections.abc import Mapping
from typing import Any, Final

from ._errors import ConfigError

logger = logging.getLogger(__name__)

Address = tuple[str, int]

DEFAULT_IP = "0.0.0.0"
DEFAULT_SECURE_PORT = 8443
DEFAULT_PLAINTEXT_PORT = 8080
DEFAULT_HEALTH_PORT = 8000
DEFAULT_CERT_CHAIN_PATH = "./extproc/ssl_creds/chain.pem"
DEFAULT_PRIVATE_KEY_PATH = "./extproc/ssl_creds/privatekey.pem"
# Envoy buffers bodies up to its per-connection limit (1 MiB by default) and Tyk sends bodies
# twice; 32 MiB leaves room for raised gateway limits without letting one message eat memory.
DEFAULT_MAX_MESSAGE_SIZE = 32 * 1024 * 1024
DEFAULT_GRACE_PERIOD = 30.0
# Gateways give up on a callout long before this (Envoy's ext_proc message_timeout and
# ext_authz timeout are 200 ms by default), so a def callback still running after 10 s helps
# nobody and only holds a thread; it is far enough above any gateway timeout that a slow but
# working callback is never cut short.
DEFAULT_CALLBACK_TIMEOUT = 10.0


ENV_PREFIX = "CALLOUTKIT_"


class Unset(enum.Enum):
    """The type of `UNSET`."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


# An option the caller did not give. Only such an option may be filled from a variable: an
# explicit False, 0 or None is a choice the environment must not undo.
UNSET: Final = Unset.UNSET

#: ``transport`` when none is given: native where calloutkit-native is installed, else grpcio.
DEFAULT_TRANSPORT: Final = "auto"
#: The native transport: the calloutkit-native distribution, `calloutkit[native]`.
NATIVE_MODULE: Final = "calloutkit_native"
NATIVE_INSTALL: Final = "pip install 'calloutkit[native]'"

# Every server option: (name, kind, help). The kind drives flag types and environment parsing;
# kinds are address | int | float | bool | str | path.
SERVER_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("address", "address", "TLS gRPC address HOST:PORT (default: DEFAULT_IP:8443)"),
    ("secure_address", "address", "same as --address"),
    ("port", "int", "port of the TLS address"),
    ("plaintext_address", "address",
     "plaintext (h2c) gRPC address, HOST:PORT or unix:/PATH (default: DEFAULT_IP:8080)"),
    ("plaintext_port", "int", "port of the plaintext address"),
    ("health_check_address", "address", "HTTP health address (default: DEFAULT_IP:8000)"),
    ("health_check_port", "int", "port of the HTTP health address"),
    ("combined_health_check", "bool", "no separate HTTP health server; gRPC health only"),
    ("secure_health_check", "bool", "serve HTTP health over HTTPS"),
    ("disable_plaintext", "bool", "no plaintext listener"),
    ("disable_tls", "bool", "no TLS listener"),
    ("default_ip", "str", "IP for addresses not given in full (default 0.0.0.0)"),
    ("cert_chain_path", "path", "PEM certificate chain for TLS"),
    ("private_key_path", "path", "PEM private key for TLS"),
    ("client_ca_path", "path", "PEM CA certificates a client's certificate must chain to (mTLS)"),
    ("require_client_auth", "bool",
     "refuse TLS clients without a certificate from client_ca_path (default: on with it)"),
    ("server_thread_count", "int", "threads that run synchronous callbacks"),
    ("grace_period", "float", "seconds streams in flight get to finish on shutdown"),
    ("stream_idle_timeout", "float",
     "end a stream that gets no message for this many seconds (default: never)"),
    ("drain_delay", "float", "seconds a stopping server still serves new streams after its "
                             "health turns NOT_SERVING (default 0)"),
    ("callback_timeout", "float", "seconds a def callback may run before its stream gets the "
                                  "error policy's reply (default 10; 0: no limit)"),
    ("metrics", "bool", "serve Prometheus metrics at /metrics (default: on when "
                        "prometheus-client is installed and there is an HTTP listener)"),
    ("metrics_address", "address",
     "HTTP address of its own for /metrics (default: on the health listener)"),
    ("tracing", "bool", "an OpenTelemetry span per callback call, to the global tracer "
                        "provider (needs calloutkit[otel])"),
    ("max_message_size", "int", "largest gRPC message accepted or sent, in bytes"),
    ("reflection", "bool", "serve gRPC reflection"),
    ("workers", "int", "worker processes sharing the ports (Linux; needs fixed ports)"),
    ("event_loop", "str", "event loop of run(): auto (uvloop when installed), uvloop, asyncio"),
    ("transport", "str", "gRPC transport: auto (native when calloutkit-native is installed, "
                         "else grpcio), grpcio or native (compiled, faster); default "
                         f"{DEFAULT_TRANSPORT}"),
)
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
TRANSPORTS = ("auto", "grpcio", "native")
PATH_DEFAULTS = {"cert_chain_path": DEFAULT_CERT_CHAIN_PATH,
                 "private_key_path": DEFAULT_PRIVATE_KEY_PATH}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_value(option: str, kind: str, environ: Mapping[str, str] | None = None) -> Any:
    """Read ``CALLOUTKIT_<OPTION>``; None when unset. Raises `ConfigError` on a bad value.

    >>> env_value("plaintext_port", "int", {"CALLOUTKIT_PLAINTEXT_PORT": "9000"})
    9000
    """
    environ = os.environ if environ is None else environ
    name = ENV_PREFIX + option.upper()
    if name not in environ:
        return None
    raw = environ[name]
    try:
        if kind == "bool":
            if raw.strip().lower() in _TRUE:
                return True
            if raw.strip().lower() in _FALSE:
                return False
            raise ValueError("expected true or false")
        if kind == "address":
            return parse_address(raw, name)
        if kind in ("int", "float"):
            return int(raw) if kind == "int" else float(raw)
        return raw
    except (ValueError, ConfigError) as exc:
        raise ConfigError(f"{name}={raw!r}: {str(exc).removeprefix(name + ': ')}") from None


def merge_environment(options: Mapping[str, Any],
                      environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Fill the options a caller did not give (`UNSET`) from ``CALLOUTKIT_*`` variables.

    Explicit arguments win, whatever their value; an option neither given nor set in the
    environment is left out, so the built-in default applies.

    >>> merge_environment({"plaintext_port": UNSET, "disable_tls": False},
    ...                   {"CALLOUTKIT_PLAINTEXT_PORT": "9", "CALLOUTKIT_DISABLE_TLS": "1"})
    {'plaintext_port': 9, 'disable_tls': False}
    """
    kinds = {option: kind for option, kind, _ in SERVER_OPTIONS}
    merged = {}
    for option, value in options.items():
        if value is UNSET:
            if option in kinds:
                value = env_value(option, kinds[option], environ)
            if value is None:
                continue
        merged[option] = value
    return merged


UNIX_PREFIX = "unix:"


def is_unix(address: Address) -> bool:
    """True for a unix socket address, ``("unix:/PATH", 0)``."""
    return address[0].startswith(UNIX_PREFIX)


def parse_address(value: object, option: str = "address") -> Address:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6), ``unix:PATH`` or a ``(host, port)`` pair.

    A unix socket (``unix:/run/plugin.sock``, ``unix:///run/plugin.sock``, or a relative
    ``unix:plugin.sock``) becomes ``("unix:<absolute path>", 0)``: gRPC's own address form.

    >>> parse_address("127.0.0.1:8080")
    ('127.0.0.1', 8080)
    >>> parse_address("unix:///run/plugin.sock")
    ('unix:/run/plugin.sock', 0)
    """
    if isinstance(value, str) and value.strip().startswith(UNIX_PREFIX):
        path = value.strip()[len(UNIX_PREFIX):]
        if path.startswith("//"):
            path = path[2:]  # unix:///abs is the URI form of unix:/abs
        if not path or "\x00" in path:
            raise ConfigError(f"{option}: {value!r} names no socket path (expected unix:/PATH)")
        return UNIX_PREFIX + os.path.abspath(path), 0
    if isinstance(value, tuple | list):
        if len(value) != 2:
            raise ConfigError(f"{option}: expected (host, port), got {value!r}")
        host, port = value
        return str(host), _parse_port(port, option)
    if not isinstance(value, str):
        raise ConfigError(f"{option}: expected HOST:PORT, got {value!r}")
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"{option}: address {value!r} has no port (expected [HOST]:PORT)")
        return host, _parse_port(rest[1:], option)
    host, sep, port = text.rpartition(":")
    if not sep or not host or ":" in host:
        raise ConfigError(f"{option}: address {value!r} has no port (expected HOST:PORT)")
    return host, _parse_port(port, option)


def _parse_port(value: object, option: str) -> int:
    try:
        port = int(str(value))
    except ValueError:
        raise ConfigError(f"{option}: port {value!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{option}: port {port} is out of range 0-65535")
    return port


def format_address(address: Address) -> str:
    """``('::1', 80)`` -> ``'[::1]:80'``; ``('0.0.0.0', 80)`` -> ``'0.0.0.0:80'``."""
    host, port = address
    if host.startswith(UNIX_PREFIX):
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def read_pem(path: str, what: str) -> bytes:
    """Read a PEM file; `ConfigError` naming it when unreadable or not PEM."""
    data = _read(path, what)
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{what} {path!r} is not PEM (no '-----BEGIN' line)")
    return data


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from None


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Where a server listens and how it behaves; built by `ServerConfig.build`.

    Example::

        config = ServerConfig.build(plaintext_address=("127.0.0.1", 0), disable_tls=True)
        assert config.secure_address is None
    """

    secure_address: Address | None
    plaintext_address: Address | None
    health_check_address: Address | None
    secure_health_check: bool
    cert_chain: bytes | None
    private_key: bytes | None
    thread_count: int
    grace_period: float
    max_message_size: int
    reflection: bool
    workers: int = 1
    event_loop: str = "asyncio"  # resolved: "uvloop" or "asyncio"
    stream_idle_timeout: float | None = None  # None: streams may idle for ever
    client_ca: bytes | None = None  # set: TLS clients need a certificate it signed
    require_client_auth: bool = False
    # Where the TLS material came from, to re-read on SIGHUP; None where given as bytes.
    cert_chain_path: str | None = None
    private_key_path: str | None = None
    client_ca_path: str | None = None
    drain_delay: float = 0.0
    callback_timeout: float | None = DEFAULT_CALLBACK_TIMEOUT  # None: no limit
    transport: str = "grpcio"  # resolved: "grpcio" or "native"
    # transport="auto" chose native: a server whose methods native cannot serve (a catch-all
    # handler) falls back to grpcio at start instead of failing.
    transport_auto: bool = False
    metrics: bool = False  # resolved: prometheus-client is there and /metrics has a listener
    metrics_address: Address | None = None  # None: /metrics on the health listener
    tracing: bool = False

    @classmethod
    def build(
        cls,
        *,
        address: Any = None,
        port: int | None = None,
        health_check_address: Any = None,
        health_check_port: int | None = None,
        combined_health_check: bool = False,
        secure_health_check: bool = False,
        plaintext_address: Any = None,
        plaintext_port: int | None = None,
        disable_plaintext: bool = False,
        default_ip: str | None = None,
        cert_chain: bytes | None = None,
        cert_chain_path: str | None = DEFAULT_CERT_CHAIN_PATH,
        private_key: bytes | None = None,
        private_key_path: str | None = DEFAULT_PRIVATE_KEY_PATH,
        server_thread_count: int | None = None,
        secure_address: Any = None,
        disable_tls: bool = False,
        grace_period: float | None = None,
        max_message_size: int | None = None,
        reflection: bool | None = None,
        workers: int | None = None,
        event_loop: str | None = None,
        stream_idle_timeout: float | None = None,
        client_ca: bytes | None = None,
        client_ca_path: str | None = None,
        require_client_auth: bool | None = None,
        drain_delay: float | None = None,
        callback_timeout: float | None = None,
        transport: str | None = None,
        metrics: bool | None = None,
        metrics_address: Any = None,
        tracing: bool | None = None,
    ) -> ServerConfig:
        """Resolve the documented constructor options into a validated config."""
        ip = default_ip or DEFAULT_IP
        if address is not None and secure_address is not None:
            raise ConfigError("give either address or secure_address, not both")
        secure: Address | None = _listener(
            secure_address if secure_address is not None else address, port, ip,
            DEFAULT_SECURE_PORT, "address")
        plain: Address | None = _listener(
            plaintext_address, plaintext_port, ip, DEFAULT_PLAINTEXT_PORT, "plaintext_address")
        health: Address | None = _listener(
            health_check_address, health_check_port, ip, DEFAULT_HEALTH_PORT,
            "health_check_address")
        if disable_plaintext:
            plain = None
        if combined_health_check:
            health = None

        chain, key = None, None
        if not disable_tls:
            chain, key = _tls_material(cert_chain, cert_chain_path, private_key, private_key_path)
            if chain is None:
                secure = None
        else:
            secure = None
        if client_ca is None and client_ca_path:
            client_ca = read_pem(client_ca_path, "client CA")
        elif client_ca is not None:
            client_ca_path = None
            if b"-----BEGIN" not in client_ca:
                raise ConfigError("client CA is not PEM (no '-----BEGIN' line)")
        if require_client_auth is None:
            require_client_auth = client_ca is not None
        if require_client_auth and client_ca is None:
            raise ConfigError("require_client_auth needs client_ca_path: the CA a client's "
                              "certificate must chain to")
        if client_ca is not None and not require_client_auth:
            raise ConfigError("client_ca_path with require_client_auth off: gRPC then asks "
                              "clients for no certificate; drop one of the two")
        if client_ca is not None and secure is None:
            raise ConfigError("client_ca_path needs the TLS listener: set cert_chain_path and "
                              "private_key_path (and leave disable_tls off)")
        if secure_health_check:
            if health is None:
                raise ConfigError("secure_health_check needs a separate health check server "
                                  "(drop combined_health_check)")
            if chain is None:
                raise ConfigError("secure_health_check needs a certificate: set cert_chain_path "
                                  "and private_key_path")
        if secure is None and plain is None:
            raise ConfigError("no listener: TLS is off (no certificate, or disable_tls) and "
                              "plaintext is disabled; enable one of them")
        grace_period = DEFAULT_GRACE_PERIOD if grace_period is None else grace_period
        max_message_size = (DEFAULT_MAX_MESSAGE_SIZE if max_message_size is None
                            else max_message_size)
        workers = 1 if workers is None else workers
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        if health is not None and is_unix(health):
            raise ConfigError("health_check_address: the HTTP health server needs HOST:PORT, "
                              "not a unix socket (use combined_health_check for gRPC health)")
        if workers > 1 and any(a is not None and is_unix(a) for a in (secure, plain)):
            raise ConfigError("workers > 1 cannot share a unix socket; use HOST:PORT")
        if workers > 1 and any(a is not None and a[1] == 0 for a in (secure, plain, health)):
            raise ConfigError("workers > 1 needs fixed ports: with port 0 each worker would "
                              "listen somewhere else")
        if server_thread_count is None:
            server_thread_count = min(32, (os.cpu_count() or 1) + 4)
        if server_thread_count < 1:
            raise ConfigError(f"server_thread_count must be >= 1, got {server_thread_count}")
        if grace_period < 0:
            raise ConfigError(f"grace_period must be >= 0 seconds, got {grace_period}")
        if stream_idle_timeout is not None and stream_idle_timeout < 0:
            raise ConfigError(f"stream_idle_timeout must be >= 0 seconds (0: never), got "
                              f"{stream_idle_timeout}")
        drain_delay = 0.0 if drain_delay is None else drain_delay
        if not 0 <= drain_delay < math.inf:  # NaN too
            raise ConfigError(f"drain_delay must be >= 0 seconds, got {drain_delay}")
        callback_timeout = (DEFAULT_CALLBACK_TIMEOUT if callback_timeout is None
                            else callback_timeout)
        if not 0 <= callback_timeout < math.inf:
            raise ConfigError(f"callback_timeout must be >= 0 seconds (0: no limit), "
                              f"got {callback_timeout}")
        metrics, metrics_at = _metrics(metrics, metrics_address, health, workers)
        if tracing and not _otel_installed():
            raise ConfigError("tracing needs OpenTelemetry: pip install 'calloutkit[otel]'")
        if max_message_size < 1024:
            raise ConfigError(f"max_message_size must be >= 1024 bytes, got {max_message_size}")
        transport, transport_auto = _transport(transport)
        return cls(secure, plain, health, secure_health_check, chain, key, server_thread_count,
                   float(grace_period), int(max_message_size), bool(reflection), workers,
                   _event_loop(event_loop),
                   float(stream_idle_timeout) if stream_idle_timeout else None,
                   client_ca, bool(require_client_auth),
                   cert_chain_path if chain is not None and cert_chain is None else None,
                   private_key_path if key is not None and private_key is None else None,
                   client_ca_path, float(drain_delay), float(callback_timeout) or None,
                   transport, transport_auto, metrics, metrics_at, bool(tracing))


def _otel_installed() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except ModuleNotFoundError:  # no opentelemetry namespace at all
        return False


def _metrics(metrics: bool | None, address: Any, health: Address | None,
             workers: int) -> tuple[bool, Address | None]:
    """Whether /metrics is served, and where: an explicit ``metrics=True`` (or a
    ``metrics_address``) that cannot be served is an error; left unset, metrics are on
    whenever they can be."""
    installed = importlib.util.find_spec("prometheus_client") is not None
    at: Address | None = None
    if address is not None:
        if metrics is False:
            raise ConfigError("metrics_address with metrics off: drop one of the two")
        at = parse_address(address, "metrics_address")
        if is_unix(at):
            raise ConfigError("metrics_address: the metrics listener needs HOST:PORT, "
                              "not a unix socket")
        if workers > 1 and at[1] == 0:
            raise ConfigError("workers > 1 needs fixed ports: with port 0 each worker would "
                              "listen somewhere else")
        metrics = True
    if metrics is False:
        return False, None
    if not installed:
        if metrics:
            raise ConfigError("metrics need prometheus-client: pip install "
                              "'calloutkit[metrics]'")
        return False, None
    if at is None and health is None:
        if metrics:
            raise ConfigError("metrics need an HTTP listener: set metrics_address, or drop "
                              "combined_health_check")
        return False, None
    return True, at


def _event_loop(choice: str | None) -> str:
    choice = "auto" if choice is None else str(choice).lower()
    if choice not in EVENT_LOOPS:
        raise ConfigError(f"event_loop must be one of {', '.join(EVENT_LOOPS)}, got {choice!r}")
    if choice == "asyncio":
        return choice
    installed = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not installed:
        raise ConfigError("event_loop=uvloop but uvloop is not installed: "
                          "pip install 'calloutkit[fast]'")
    return "uvloop" if installed else "asyncio"


def _transport(choice: str | None) -> tuple[str, bool]:
    """The transport to serve on, and whether ``auto`` chose it. ``auto`` takes native when
    calloutkit-native loads, else grpcio, saying why in one INFO line; an explicit ``native``
    that cannot be had is an error."""
    choice = DEFAULT_TRANSPORT if choice is None else str(choice).lower()
    if choice not in TRANSPORTS:
        raise ConfigError(f"transport must be one of {', '.join(TRANSPORTS)}, got {choice!r}")
    if choice == "grpcio":
        return choice, False
    missing = native_unavailable()
    if choice == "native":
        if missing is not None:
            raise ConfigError(f"transport=native but {missing}: {NATIVE_INSTALL}")
        return choice, False
    if missing is not None:
        logger.info("transport=auto: serving on grpcio, %s (for the native transport: %s)",
                    missing, NATIVE_INSTALL)
        return "grpcio", False
    return "native", True


@functools.cache
def native_unavailable() -> str | None:
    """Why the native transport cannot be had here (one phrase), or None when it can."""
    try:
        importlib.import_module(NATIVE_MODULE)
    except ImportError as exc:
        if exc.name == NATIVE_MODULE:
            return "calloutkit-native is not installed"
        # Installed but unloadable (a wheel for another platform, a missing library).
        return f"{NATIVE_MODULE} does not load ({exc})"
    return None


def _listener(address: Any, port: int | None, ip: str, default_port: int,
              option: str) -> Address:
    host, resolved_port = (ip, default_port) if address is None else parse_address(address, option)
    if port is not None and host.startswith(UNIX_PREFIX):
        raise ConfigError(f"{option.replace('address', 'port')}: a unix socket address "
                          f"({host}) has no port")
    if port is not None:
        resolved_port = _parse_port(port, option.replace("address", "port"))
    return host, resolved_port


def _tls_material(cert_chain: bytes | None, cert_chain_path: str | None,
                  private_key: bytes | None,
                  private_key_path: str | None) -> tuple[bytes | None, bytes | None]:
    defaults = (cert_chain_path in (None, DEFAULT_CERT_CHAIN_PATH)
                and private_key_path in (None, DEFAULT_PRIVATE_KEY_PATH))
    if cert_chain is None and cert_chain_path:
        if defaults and private_key is None and not os.path.exists(cert_chain_path):
            logger.warning(
                "TLS listener not started: no certificate at %s. Pass cert_chain_path and "
                "private_key_path (--cert_chain_path/--private_key_path) to serve TLS, or "
                "disable_tls=True to silence this.", cert_chain_path)
            return None, None
        cert_chain = _read(cert_chain_path, "certificate chain")
    if private_key is None and private_key_path:
        private_key = _read(private_key_path, "private key")
    if cert_chain is None or private_key is None:
        missing = "private key" if cert_chain is not None else "certificate chain"
        if cert_chain is None and private_key is None:
            return None, None
        raise ConfigError(f"TLS needs both a certificate chain and a private key; the {missing} "
                          "is missing")
    if b"-----BEGIN" not in cert_chain:
        raise ConfigError("certificate chain is not PEM (no '-----BEGIN' line)")
    if b"-----BEGIN" not in private_key:
        raise ConfigError("private key is not PEM (no '-----BEGIN' line)")
    return cert_chain, private_key
