"""The lock and pyproject.toml agree, and the environment the tests run in is the lock."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from lockfile import BENCH_LOCK, DEV_LOCK, REQUIREMENTS, here, pins
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# Built from this repository (native/), so not in the lock: `make install` installs it from its
# folder (a directory has no hash to check); tests/test_packaging.py checks its pin.
OURS = {"calloutkit-native"}


def _declared() -> list[tuple[str, Requirement]]:
    """Every requirement the locks must satisfy, with where it is declared."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [("dependencies", Requirement(text)) for text in project["dependencies"]]
    for extra, texts in project["optional-dependencies"].items():
        found += [(f"[{extra}]", Requirement(text)) for text in texts]
    for name in ("tools.in", "bench.in"):
        for line in (REQUIREMENTS / name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                found.append((name, Requirement(line)))
    return found


def test_every_declared_requirement_is_locked_at_a_version_it_allows() -> None:
    locked = {**pins(DEV_LOCK), **pins(BENCH_LOCK)}
    wrong = []
    for where, requirement in _declared():
        if canonicalize_name(requirement.name) in OURS:
            assert not locked.get(canonicalize_name(requirement.name)), requirement
            continue
        options = locked.get(canonicalize_name(requirement.name))
        if not options:
            wrong.append(f"{requirement} ({where}) is not in the lock")
            continue
        for version, _ in options:
            if not requirement.specifier.contains(version, prereleases=True):
                wrong.append(f"{requirement} ({where}) but the lock has {version}")
    assert not wrong, "\n".join(wrong) + "\nrun `make lock`"


def test_the_bench_lock_agrees_with_the_dev_lock() -> None:
    dev = here(DEV_LOCK)
    clashes = {name: (dev[name], version) for name, version in here(BENCH_LOCK).items()
               if name in dev and dev[name] != version}
    assert not clashes, f"{clashes}: run `make lock`"


def test_the_locks_are_refreshed_by_their_documented_command() -> None:
    for lock in (DEV_LOCK, BENCH_LOCK):
        assert "#    make lock\n" in lock.read_text(), f"{lock.name}: refresh it with `make lock`"
    assert "\nlock:" in (ROOT / "Makefile").read_text()


def test_every_pin_carries_hashes() -> None:
    for lock in (DEV_LOCK, BENCH_LOCK):
        blocks = lock.read_text().split("\n")
        starts = [i for i, line in enumerate(blocks) if line[:1].isalnum()]
        unhashed = [blocks[i] for i in starts if "--hash=sha256:" not in blocks[i + 1]]
        assert not unhashed, f"{lock.name}: {unhashed}"


def test_the_installed_environment_is_the_lock() -> None:
    """A stale ./.venv (or an install that bypassed the lock) fails here, not in a drift test."""
    differ = {}
    for name, version in here(DEV_LOCK).items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            differ[name] = (version, "missing")
            continue
        if installed != version:
            differ[name] = (version, installed)
    assert not differ, f"locked vs installed: {differ}; run `make clean install`"
