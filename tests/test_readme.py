"""The README's first steps work as written, in a folder of the user's own."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import REPO, read_until, spawn, stop_process

README = (Path(REPO) / "README.md").read_text()
_BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)
CALLOUTKIT = os.path.join(os.path.dirname(sys.executable), "calloutkit")


def block(language: str, start: str) -> str:
    """The README's one code block in ``language`` that begins with ``start``."""
    found = [text for lang, text in _BLOCK.findall(README)
             if lang == language and text.startswith(start)]
    assert len(found) == 1, f"README has {len(found)} {language} blocks starting {start!r}"
    return found[0]


def serve_command() -> list[str]:
    """The arguments of the README's ``calloutkit serve`` line (after ``calloutkit``)."""
    lines = [line for line in block("sh", ".venv/bin/calloutkit serve server.py").splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(lines) == 1, lines
    program, *args = shlex.split(lines[0])
    assert os.path.basename(program) == "calloutkit"
    return args


def test_the_testing_snippet_passes_beside_the_smallest_server(tmp_path: Path) -> None:
    """No settings but the README's: its pyproject.toml, pytest in the folder."""
    (tmp_path / "server.py").write_text(block("python", "# server.py\n"))
    (tmp_path / "test_server.py").write_text(block("python", "# test_server.py\n"))
    (tmp_path / "pyproject.toml").write_text(block("toml", "# pyproject.toml\n"))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout


def test_the_smallest_server_runs_as_the_readme_says(tmp_path: Path) -> None:
    """The README's serve line, on a kernel-chosen port (its 8080 may be taken here), and
    the health listener moved off 8000 by its documented variable."""
    (tmp_path / "server.py").write_text(block("python", "# server.py\n"))
    args = serve_command()
    at = args.index("--plaintext_address") + 1
    assert args[at] == "127.0.0.1:8080"
    args[at] = "127.0.0.1:0"
    process = spawn([CALLOUTKIT, *args], cwd=str(tmp_path),
                    env={"CALLOUTKIT_HEALTH_CHECK_ADDRESS": "127.0.0.1:0"})
    try:
        line = read_until(process, "serving:")
        assert "Server serving: grpc 127.0.0.1:" in line
    finally:
        stop_process(process)


def test_python_m_server_runs_with_the_linked_entry_point(tmp_path: Path) -> None:
    """The entry point the README links to, added to the smallest server, then ``python -m
    server``; ports from the documented variables (the defaults are fixed ports)."""
    assert "(docs/guide/creating-a-server.md#running-it)" in README
    guide = (Path(REPO) / "docs" / "guide" / "creating-a-server.md").read_text()
    running = guide[guide.index("## Running it"):guide.index("\n## ", guide.index("## Running it"))]
    entry_points = [text for lang, text in _BLOCK.findall(running)
                    if lang == "python" and text.startswith('if __name__ == "__main__":\n')]
    assert len(entry_points) == 1
    (tmp_path / "server.py").write_text(block("python", "# server.py\n") + "\n\n"
                                        + entry_points[0])
    process = spawn([sys.executable, "-m", "server"], cwd=str(tmp_path),
                    env={"CALLOUTKIT_PLAINTEXT_ADDRESS": "127.0.0.1:0",
                         "CALLOUTKIT_HEALTH_CHECK_ADDRESS": "127.0.0.1:0"})
    try:
        assert "Server serving: grpc 127.0.0.1:" in read_until(process, "serving:")
    finally:
        stop_process(process)
