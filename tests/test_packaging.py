"""calloutkit and calloutkit-native as a user installs them: the two wheels `make wheels`
builds, installed into a fresh virtual environment with no Rust toolchain on PATH and no
index to download from, serving a real request; and calloutkit alone, without the native
transport, falling back to grpc.aio under ``transport=auto``.

The wheel tests cost a `make wheels` (a release build of native/, incremental on
native/target: seconds after `make install`, minutes from a cold target) and two virtual
environments: they carry the ``wheels`` mark (``pytest -m "not wheels"`` skips them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import REPO, stop_process
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from calloutkit.testing import http_headers

ROOT = Path(REPO)
SERVER = ROOT / "tests" / "servers" / "pid_server.py"
METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
TOOLCHAIN = ("cargo", "rustc", "rustup", "maturin")


def test_the_native_extra_pins_the_native_distribution_at_calloutkit_s_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    native = tomllib.loads((ROOT / "native" / "pyproject.toml").read_text())
    cargo = tomllib.loads((ROOT / "native" / "Cargo.toml").read_text())["package"]
    assert native["project"]["name"] == cargo["name"] == "calloutkit-native"
    assert native["project"]["dynamic"] == ["version"]  # from Cargo.toml
    assert cargo["version"] == project["version"]
    assert project["optional-dependencies"]["native"] == [
        f"calloutkit-native=={project['version']}"]
    assert native["tool"]["maturin"]["module-name"] == "calloutkit_native"
    assert (ROOT / "native" / "calloutkit_native.pyi").is_file()


# -- the wheels, installed where nothing can be built or downloaded ----------------------------

def _no_toolchain_path() -> str:
    """PATH without any folder holding a Rust toolchain (or maturin)."""
    kept = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not any(os.path.exists(os.path.join(d, tool)) for tool in TOOLCHAIN)]
    path = os.pathsep.join(kept)
    assert not any(shutil.which(tool, path=path) for tool in TOOLCHAIN)
    return path


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The README's `make wheels`, into a folder of the test's own."""
    dist = tmp_path_factory.mktemp("dist")
    result = subprocess.run(["make", "-s", "wheels", f"DIST={dist}"], cwd=REPO,
                            capture_output=True, text=True, timeout=900,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = {path.name.split("-")[0]: path for path in dist.glob("*.whl")}
    assert set(found) == {"calloutkit", "calloutkit_native"}, found
    # Pure Python, any platform; the native one abi3: one wheel for every Python >= 3.11.
    assert found["calloutkit"].name.endswith("-py3-none-any.whl")
    assert re.search(r"-cp311-abi3-[a-z0-9_]+\.whl$", found["calloutkit_native"].name)
    return found


@pytest.fixture(scope="module")
def dependencies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """calloutkit's dependencies without downloading them: this environment's installed
    packages, less calloutkit and calloutkit-native themselves (and its .pth hooks, which
    would put the source tree back on the path)."""
    folder = tmp_path_factory.mktemp("dependencies")
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        name = entry.name.lower()
        if (name.startswith(("calloutkit", "__editable__")) or name.endswith(".pth")
                or name == "__pycache__"):
            continue
        (folder / entry.name).symlink_to(entry)
    return folder


def fresh_venv(where: Path, dependencies: Path, wheels: list[Path]) -> Path:
    """A new virtual environment, the ``wheels`` installed into it by pip from files only."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True,
                   timeout=120, stdin=subprocess.DEVNULL)
    (Path(sysconfig.get_paths(vars={"base": str(where), "platbase": str(where)})["purelib"])
     / "_dependencies.pth").write_text(f"{dependencies}\n")
    python = where / "bin" / "python"
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-index", "--no-cache-dir",
         "--disable-pip-version-check", *map(str, wheels)],
        env=clean_env(where), capture_output=True, text=True, timeout=300,
        stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return python


def clean_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "VIRTUAL_ENV", "CALLOUTKIT_", "CARGO", "RUSTUP"))}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), _no_toolchain_path()])
    return env


@pytest.fixture(scope="module")
def with_native(tmp_path_factory: pytest.TempPathFactory, wheels: dict[str, Path],
                dependencies: Path) -> Path:
    where = tmp_path_factory.mktemp("with-native") / "venv"
    # The extra resolves to the native wheel beside it: what `pip install 'calloutkit[native]'`
    # does from an index.
    fresh_venv(where, dependencies,
               [Path(f"{wheels['calloutkit']}[native]"), wheels["calloutkit_native"]])
    return where


@pytest.fixture(scope="module")
def without_native(tmp_path_factory: pytest.TempPathFactory, wheels: dict[str, Path],
                   dependencies: Path) -> Path:
    where = tmp_path_factory.mktemp("without-native") / "venv"
    fresh_venv(where, dependencies, [wheels["calloutkit"]])
    return where


def run(venv: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], env=clean_env(venv),
                          cwd=venv.parent, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def where_from(venv: Path, module: str) -> str:
    result = run(venv, "python", "-c", f"import {module}; print({module}.__file__)")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    started: list[subprocess.Popen[str]] = []

    def start(venv: Path, *options: str) -> tuple[subprocess.Popen[str], list[str]]:
        shutil.copy(SERVER, tmp_path / "server.py")
        process = subprocess.Popen(
            [str(venv / "bin" / "calloutkit"), "serve", "server.py", "--plaintext_address",
             "127.0.0.1:0", "--health_check_address", "127.0.0.1:0", "--disable_tls",
             *options],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
            env=clean_env(venv), stdin=subprocess.DEVNULL, start_new_session=True)
        started.append(process)
        lines = []
        assert process.stdout is not None
        while not lines or "serving:" not in lines[-1]:
            line = process.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        return process, lines

    yield start
    for process in started:
        stop_process(process)


def answer(serving_line: str) -> str:
    """One real ext_proc request to the server that printed ``serving_line``; the header it
    adds (the answering process's pid)."""
    port = int(serving_line.split("grpc 127.0.0.1:")[1].split(",")[0])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(METHOD,
                                     request_serializer=pb.ProcessingRequest.SerializeToString,
                                     response_deserializer=pb.ProcessingResponse.FromString)
        request = pb.ProcessingRequest(request_headers=http_headers(
            {":path": "/", ":method": "GET"}, end_of_stream=True))
        (reply,) = list(call(iter([request]), timeout=10))
    (header,) = reply.request_headers.response.header_mutation.set_headers
    assert header.header.key == "x-worker-pid"
    return header.header.raw_value.decode()


@pytest.mark.wheels
def test_the_wheels_install_without_rust_and_serve_on_native(with_native: Path, serve) -> None:
    site = str(with_native)
    assert where_from(with_native, "calloutkit").startswith(site)
    assert where_from(with_native, "calloutkit_native").startswith(site)
    version = run(with_native, "calloutkit", "--version")
    assert "native (calloutkit-native 0.1.0)" in version.stdout, version
    process, lines = serve(with_native, "--transport", "native")
    assert "native transport" in lines[-1]
    assert answer(lines[-1]) == str(process.pid)


@pytest.mark.wheels
def test_without_calloutkit_native_auto_serves_on_grpcio(without_native: Path, serve) -> None:
    assert where_from(without_native, "calloutkit").startswith(str(without_native))
    assert run(without_native, "python", "-c", "import calloutkit_native").returncode == 1
    version = run(without_native, "calloutkit", "--version")
    assert ("native unavailable: calloutkit-native is not installed "
            "(pip install 'calloutkit[native]')") in version.stdout, version
    process, lines = serve(without_native, "--transport", "auto")
    (why,) = [line for line in lines if "transport=auto" in line]
    assert " INFO " in why
    assert ("serving on grpcio, calloutkit-native is not installed (for the native "
            "transport: pip install 'calloutkit[native]')") in why
    assert "native transport" not in lines[-1]
    assert answer(lines[-1]) == str(process.pid)


@pytest.mark.wheels
def test_without_calloutkit_native_an_explicit_native_is_refused(without_native: Path,
                                                                  tmp_path: Path) -> None:
    shutil.copy(SERVER, tmp_path / "server.py")
    result = subprocess.run(
        [str(without_native / "bin" / "calloutkit"), "serve", "server.py",
         "--plaintext_address", "127.0.0.1:0", "--health_check_address", "127.0.0.1:0",
         "--disable_tls", "--transport", "native"],
        cwd=tmp_path, env=clean_env(without_native), capture_output=True, text=True,
        timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr == ("calloutkit: error: transport=native but calloutkit-native is not "
                             "installed: pip install 'calloutkit[native]'\n")
