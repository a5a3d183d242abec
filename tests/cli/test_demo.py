"""``calloutkit demo``: the README's main job, once and until it is told to stop."""

from __future__ import annotations

import os
import signal
import sys
import time

from conftest import alive, free_port, read_until, run_cli, spawn, stop_process


def envoy_folders(folder: str) -> list[str]:
    return [name for name in os.listdir(folder) if name.startswith("calloutkit-envoy-")]


def test_demo_once_shows_both_mutations_and_exits_0(temp_dir):
    result = run_cli("demo", "--once", "--port", str(free_port()), timeout=120,
                     env={"TMPDIR": temp_dir})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "x-calloutkit-request: seen /hello?from=calloutkit" in result.stdout
    assert "x-calloutkit-response: added" in result.stdout
    assert envoy_folders(temp_dir) == []


def _envoy_children(pid: int) -> list[int]:
    """Envoy processes started by any thread of ``pid`` (the demo starts it from a thread)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            for child in map(int, handle.read().split()):
                with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                    if b"envoy" in cmdline.read().split(b"\0")[0]:
                        found.append(child)
    return found


def test_sigterm_stops_the_demo_and_its_envoy(temp_dir):
    envoys: list[int] = []
    demo = spawn([sys.executable, "-m", "calloutkit", "demo", "--port", str(free_port())],
                 env={"TMPDIR": temp_dir})
    try:
        read_until(demo, "Press Ctrl-C to stop.")
        envoys = _envoy_children(demo.pid)
        assert envoys, "the demo runs Envoy as its child"
        assert len(envoy_folders(temp_dir)) == 1  # the folder is where the test looks
        os.kill(demo.pid, signal.SIGTERM)
        assert demo.wait(30) == 0
        assert envoy_folders(temp_dir) == []
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in envoys) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in envoys), "Envoy outlived the demo"
    finally:
        stop_process(demo)
        for pid in envoys:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
