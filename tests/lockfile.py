"""Reading ``requirements/*.lock``: the exact versions every install of the project uses."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements"
DEV_LOCK = REQUIREMENTS / "dev.lock"
BENCH_LOCK = REQUIREMENTS / "bench.lock"

# `name==version ; marker \` at the start of a line; hashes and comments follow indented.
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)(?:\s*;\s*([^\\]+?))?\s*\\?$",
                  re.MULTILINE)


def pins(path: Path = DEV_LOCK) -> dict[str, list[tuple[str, Marker | None]]]:
    """Canonical name -> every (version, marker) the lock pins for it (one per platform fork)."""
    found: dict[str, list[tuple[str, Marker | None]]] = {}
    for name, version, marker in _PIN.findall(path.read_text()):
        found.setdefault(canonicalize_name(name), []).append(
            (version, Marker(marker) if marker else None))
    return found


def here(path: Path = DEV_LOCK) -> dict[str, str]:
    """Canonical name -> the version the lock installs on this interpreter and platform."""
    chosen = {}
    for name, options in pins(path).items():
        for version, marker in options:
            if marker is None or marker.evaluate():
                chosen[name] = version
    return chosen
