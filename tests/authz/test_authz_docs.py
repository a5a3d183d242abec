"""docs/authz.md stays true: its Envoy bootstrap validates with the real binary, its
examples exist, and the index links it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from calloutkit.testing import find_envoy

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGE = (DOCS / "authz.md").read_text()


def test_the_index_links_the_page_and_the_page_links_real_files() -> None:
    assert "(authz.md)" in (DOCS / "index.md").read_text()
    for target in re.findall(r"\]\((\.\./[^)]+)\)", PAGE):
        assert (DOCS / target).resolve().is_file(), target


@pytest.mark.envoy
def test_the_envoy_bootstrap_validates(tmp_path: Path) -> None:
    [config] = [b for b in re.findall(r"```yaml\n(.*?)```", PAGE, re.S)
                if "static_resources:" in b]
    path = tmp_path / "envoy.yaml"
    path.write_text(config)
    result = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(path),
                             "--use-dynamic-base-id", "--disable-hot-restart"],
                            capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
