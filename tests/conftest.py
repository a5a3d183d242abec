"""Shared fixtures: TLS material, servers on ephemeral ports, a local upstream."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from transports import parametrize, server_transport  # noqa: F401 (a fixture for every test)

from calloutkit import BaseServer
from calloutkit.testing import UpstreamServer

_SUITE_TMP = pytest.StashKey[str]()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK = {"plaintext_address": ("127.0.0.1", 0), "disable_tls": True,
            "combined_health_check": True}


def pytest_sessionstart(session: pytest.Session) -> None:
    """Run the suite in a temporary folder of its own, so what it leaves there can be seen."""
    folder = tempfile.mkdtemp(prefix="calloutkit-suite-")
    session.config.stash[_SUITE_TMP] = folder
    os.environ["TMPDIR"] = folder  # for the processes tests start
    tempfile.tempdir = folder


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when anything the suite started left a temporary folder behind."""
    folder = session.config.stash.get(_SUITE_TMP, None)
    if folder is None:
        return
    left = sorted(name for name in os.listdir(folder) if not name.startswith("pytest-of-"))
    shutil.rmtree(folder, ignore_errors=True)
    if left:
        print(f"\ntemporary folders left behind by the suite: {', '.join(left)}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize(metafunc)  # the protocol suites, on each transport (tests/transports.py)


def pytest_report_header() -> str:
    """The versions this run really uses, so a failure can be matched to its environment."""
    from importlib import metadata

    from lockfile import DEV_LOCK, here

    versions = []
    for name in sorted(here(DEV_LOCK)):
        try:
            versions.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return f"installed from {DEV_LOCK.name}: " + ", ".join(versions)


def free_port() -> int:
    """A port that was free a moment ago (for processes that must be told a port up front)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Certs:
    """A throwaway CA and a server certificate for localhost/127.0.0.1, as PEM files."""

    def __init__(self, folder: str) -> None:
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "calloutkit test CA")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                    critical=False)
                .sign(ca_key, hashes.SHA256()))
        self.ca_pem = ca.public_bytes(serialization.Encoding.PEM)
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self.key_pem = key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        self.ca_path = os.path.join(folder, "ca.pem")
        self.cert_path = os.path.join(folder, "chain.pem")
        self.key_path = os.path.join(folder, "key.pem")
        for path, data in ((self.ca_path, self.ca_pem), (self.cert_path, self.cert_pem),
                           (self.key_path, self.key_pem)):
            with open(path, "wb") as handle:
                handle.write(data)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(str(tmp_path_factory.mktemp("certs")))


@pytest.fixture
def temp_dir(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty temp dir for this process and the processes it starts."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        yield server


@contextlib.asynccontextmanager
async def running(server: BaseServer, grace: float = 1.0) -> AsyncIterator[BaseServer]:
    """Start ``server`` for the duration of a block, then drain it."""
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
            cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``calloutkit ARGS`` to completion (for commands that exit by themselves)."""
    return subprocess.run([sys.executable, "-m", "calloutkit", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})},
                          cwd=cwd or REPO, stdin=subprocess.DEVNULL, start_new_session=True)


def spawn(argv: list[str], env: dict[str, str] | None = None,
          cwd: str | None = None) -> subprocess.Popen[str]:
    """Start a long-running process in its own session (stop it by its pid)."""
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, cwd=cwd or REPO,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def read_until(process: subprocess.Popen[str], needle: str, limit: int = 200) -> str:
    """Read the process's output line by line until a line contains ``needle``."""
    assert process.stdout is not None
    seen = []
    for _ in range(limit):
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} never printed; output:\n{''.join(seen)}")


def read_all(process: subprocess.Popen[str], needles: dict[str, int],
             limit: int = 200) -> dict[str, list[str]]:
    """Read lines until each needle was seen its number of times, in any order (workers may
    print before their supervisor does); the lines that had each needle."""
    assert process.stdout is not None
    found: dict[str, list[str]] = {needle: [] for needle in needles}
    seen = []
    for _ in range(limit):
        if all(len(found[needle]) >= count for needle, count in needles.items()):
            return found
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        for needle in needles:
            if needle in line:
                found[needle].append(line)
    if all(len(found[needle]) >= count for needle, count in needles.items()):
        return found
    raise AssertionError(f"{needles} never all printed; output:\n{''.join(seen)}")


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody has reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def stop_process(process: subprocess.Popen[Any]) -> None:
    """Kill a process started by `spawn` (its whole session) and close its pipe."""
    if process.poll() is None:
        os.killpg(process.pid, 9)
        process.wait(10)
    if process.stdout is not None:
        process.stdout.close()
