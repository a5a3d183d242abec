"""docs/authz.md stays true: its examples exist and the index links it (its Envoy bootstrap
is validated with every other one in tests/extproc/test_examples_docs.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

# No test here starts a server: each runs once, not per transport.
pytestmark = pytest.mark.no_server

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGE = (DOCS / "authz.md").read_text()


def test_the_index_links_the_page_and_the_page_links_real_files() -> None:
    assert "(authz.md)" in (DOCS / "index.md").read_text()
    for target in re.findall(r"\]\((\.\./[^)]+)\)", PAGE):
        assert (DOCS / target).resolve().is_file(), target
