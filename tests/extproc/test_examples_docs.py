"""The developer guide stays true: every example has its page, every Envoy config in it works."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_examples_harness import EXAMPLES, Gateway

from calloutkit.testing import Envoy, find_envoy, http_request

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide"
_YAML_BLOCK = re.compile(r"```yaml\n(.*?)```", re.S)
_PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def example_names() -> list[str]:
    """The L7 examples: those whose server subclasses `CalloutServer` (other server kinds have
    guides of their own)."""
    return sorted(p.parent.name for p in EXAMPLES.glob("*/server.py")
                  if re.search(r"^class \w+\(CalloutServer\):", p.read_text(), re.M))


def bootstraps() -> list[tuple[str, str]]:
    """Every complete Envoy config (a YAML block with static_resources) in the docs."""
    found = []
    for page in sorted(GUIDE.parent.rglob("*.md")):
        for n, block in enumerate(_YAML_BLOCK.findall(page.read_text())):
            if "static_resources:" in block:
                found.append((f"{page.relative_to(GUIDE.parent)}#{n}", block))
    return found


@pytest.mark.no_server
def test_every_example_has_a_page_linked_from_the_index() -> None:
    index = (GUIDE / "index.md").read_text()
    assert len(example_names()) >= 18
    for name in example_names():
        assert (GUIDE / "examples" / f"{name}.md").is_file(), name
        assert f"(examples/{name}.md)" in index, name


@pytest.mark.no_server
def test_every_page_linked_from_the_index_exists() -> None:
    index = (GUIDE / "index.md").read_text()
    for target in re.findall(r"\]\(([^)#]+\.md)\)", index):
        assert (GUIDE / target).resolve().is_file(), target


@pytest.mark.no_server
@pytest.mark.envoy
@pytest.mark.parametrize(("where", "config"), bootstraps())
def test_envoy_configs_in_the_docs_validate(where: str, config: str, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(config)
    result = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(path),
                             "--use-dynamic-base-id", "--disable-hot-restart"],
                            capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    assert result.returncode == 0, f"{where}: {result.stdout[-2000:]}{result.stderr[-2000:]}"


@pytest.mark.envoy
def test_the_testing_page_examples_pass(tmp_path: Path) -> None:
    """The testing guide's server and tests, run as a user would: pytest in their project."""
    server, *tests = _PYTHON_BLOCK.findall((GUIDE / "testing.md").read_text())
    assert server.startswith("# server.py")
    (tmp_path / "server.py").write_text(server)
    (tmp_path / "test_server.py").write_text("\n".join(tests))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
         "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function",
         "test_server.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL, start_new_session=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 passed" in result.stdout


def _ports_freed(config: dict[str, Any], callout: int, app: int) -> dict[str, Any]:
    """The guide's config on kernel-chosen ports, pointing at the test's servers."""
    config["admin"]["address"]["socket_address"]["port_value"] = 0
    for listener in config["static_resources"]["listeners"]:
        listener["address"]["socket_address"]["port_value"] = 0
    for cluster in config["static_resources"]["clusters"]:
        port = callout if cluster["name"] == "callout" else app
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                endpoint["endpoint"]["address"]["socket_address"]["port_value"] = port
    return config


@pytest.mark.envoy
def test_the_complete_config_serves_the_basic_example() -> None:
    (block,) = [b for where, b in bootstraps() if where.startswith("guide/envoy.md")]
    with Gateway(["basic"]) as gateway:  # for the callout server and the upstream
        callout = gateway.servers["basic"].plaintext_port or 0
        config = _ports_freed(yaml.safe_load(block), callout, gateway.upstream.port)
        with Envoy(config) as envoy:
            deadline = time.monotonic() + 10
            while True:  # until the active gRPC health check has seen the callout
                response = http_request(envoy.url + "/upload", "POST", [("foo", "bar")],
                                        "hello")
                if response.status == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert response.status == 200, envoy.log_tail()
            seen = gateway.seen()
            assert seen["headers"]["host"] == "service.calloutkit.example"  # allow_all_routing
            assert "foo" not in seen["headers"]
            assert seen["body"] == "replaced-body"
            assert response.header("hello") == "calloutkit"
            assert response.body == b""
