"""The deployment files: the Dockerfile, the Kubernetes manifests, the Envoy Gateway policy
and the plain Envoy config, checked with the real tools, and the image's command run."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from conftest import free_port, spawn, stop_process
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes_validate import utils as kubernetes

from calloutkit.runtime._config import DEFAULT_HEALTH_PORT, DEFAULT_PLAINTEXT_PORT
from calloutkit.testing import find_envoy

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
KUBERNETES = ROOT / "deploy" / "kubernetes"
POLICY = ROOT / "deploy" / "envoy-gateway" / "envoy-extension-policy.yaml"
ENVOY_CONFIG = ROOT / "deploy" / "envoy" / "envoy.yaml"
BIN = Path(sys.executable).parent
# The oldest Kubernetes release still commonly run, and the newest the schemas know.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes.latest_version())


# -- the Dockerfile ---------------------------------------------------------------------------

def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert binary, "hadolint is not installed: make install"
    return subprocess.run([binary, "--no-color", str(path)], capture_output=True, text=True,
                          timeout=60)


def test_dockerfile_lints_clean():
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_shell_form_entrypoint(tmp_path):
    # The linter is really reading the file: the shell form (which would keep SIGTERM from
    # reaching calloutkit) fails it.
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace('ENTRYPOINT ["calloutkit", "serve"]',
                                                  "ENTRYPOINT calloutkit serve"))
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3025" in result.stdout


def test_dockerfile_shape():
    steps = instructions(DOCKERFILE.read_text())
    bases = [args for word, args in steps if word == "FROM"]
    assert len(bases) == 2 and all(b.startswith("python:3.11-slim") for b in bases)
    assert bases[0].endswith(" AS build")
    final = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM"):]
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    entrypoint = [json.loads(args) for word, args in final if word == "ENTRYPOINT"]
    assert entrypoint == [["calloutkit", "serve"]]
    (check,) = [args for word, args in final if word == "HEALTHCHECK"]
    assert "curl" not in check and "wget" not in check
    assert json.loads(check.partition(" CMD ")[2])[0] == "python"


# -- the Kubernetes manifests -----------------------------------------------------------------

def manifests() -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[document["kind"]] = document
    return found


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version):
    found = manifests()
    assert set(found) == {"Deployment", "Service", "PodDisruptionBudget",
                          "HorizontalPodAutoscaler"}
    assert found["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2"
    for document in found.values():
        kubernetes.validate(document, version, strict=True)


def test_the_schemas_reject_a_wrong_field():
    deployment = manifests()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"][
        "paht"] = "/"
    with pytest.raises(kubernetes.ValidationError):
        kubernetes.validate(deployment, kubernetes.latest_version(), strict=True)


def container() -> dict[str, Any]:
    (only,) = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def deployment_env() -> dict[str, str]:
    return {item["name"]: item["value"] for item in container()["env"]}


def test_probes_and_ports_are_the_servers_defaults():
    found = manifests()
    ports = {port["name"]: port["containerPort"] for port in container()["ports"]}
    assert ports == {"grpc": DEFAULT_PLAINTEXT_PORT, "health": DEFAULT_HEALTH_PORT}
    env = deployment_env()
    assert int(env["CALLOUTKIT_PLAINTEXT_PORT"]) == DEFAULT_PLAINTEXT_PORT
    assert int(env["CALLOUTKIT_HEALTH_CHECK_PORT"]) == DEFAULT_HEALTH_PORT
    readiness = container()["readinessProbe"]["httpGet"]
    assert ports[readiness["port"]] == DEFAULT_HEALTH_PORT
    assert container()["livenessProbe"]["grpc"]["port"] == DEFAULT_PLAINTEXT_PORT
    (service_port,) = found["Service"]["spec"]["ports"]
    assert ports[service_port["targetPort"]] == DEFAULT_PLAINTEXT_PORT
    assert service_port["appProtocol"] == "kubernetes.io/h2c"
    selector = found["Deployment"]["spec"]["selector"]["matchLabels"]
    for kind in ("Service", "PodDisruptionBudget"):
        spec = found[kind]["spec"]
        assert spec.get("selector", {}).get("matchLabels", spec.get("selector")) == selector
    assert found["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == (
        found["Deployment"]["metadata"]["name"])
    # The Dockerfile exposes the same ports.
    exposed = [args for word, args in instructions(DOCKERFILE.read_text()) if word == "EXPOSE"]
    assert sorted(map(int, exposed[-1].split())) == sorted(
        [DEFAULT_PLAINTEXT_PORT, DEFAULT_HEALTH_PORT])


def test_termination_grace_outlasts_the_prestop_sleep_and_the_drain():
    spec = manifests()["Deployment"]["spec"]["template"]["spec"]
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = float(deployment_env()["CALLOUTKIT_GRACE_PERIOD"])
    assert spec["terminationGracePeriodSeconds"] > float(command[1]) + drain


# -- Envoy Gateway and plain Envoy -------------------------------------------------------------

def test_envoy_extension_policy_points_at_the_service():
    # The EnvoyExtensionPolicy CRD's schema does not ship with kubernetes-validate and is not
    # on this machine, so its fields are checked here against the CRD as documented
    # (gateway.envoyproxy.io/v1alpha1), not validated by a schema.
    policy = yaml.safe_load(POLICY.read_text())
    service = manifests()["Service"]
    assert (policy["apiVersion"], policy["kind"]) == ("gateway.envoyproxy.io/v1alpha1",
                                                      "EnvoyExtensionPolicy")
    assert set(policy) == {"apiVersion", "kind", "metadata", "spec"}
    spec = policy["spec"]
    assert set(spec) == {"targetRefs", "extProc"}
    for ref in spec["targetRefs"]:
        assert ref["group"] == "gateway.networking.k8s.io"
        assert ref["kind"] in {"Gateway", "HTTPRoute", "GRPCRoute"} and ref["name"]
    (ext_proc,) = spec["extProc"]
    assert set(ext_proc) <= {"backendRefs", "processingMode", "messageTimeout", "failOpen",
                             "backendSettings", "metadata", "forwardingMetadata"}
    (backend,) = ext_proc["backendRefs"]
    assert backend == {"name": service["metadata"]["name"],
                       "port": service["spec"]["ports"][0]["port"]}
    for direction, mode in ext_proc["processingMode"].items():
        assert direction in {"request", "response"}
        assert set(mode) <= {"body", "attributes"}
        assert mode.get("body", "Buffered") in {"Streamed", "Buffered", "BufferedPartial",
                                                "FullDuplexStreamed"}
    assert re.fullmatch(r"([0-9]{1,5}(h|m|s|ms)){1,4}", ext_proc["messageTimeout"])
    assert ext_proc["failOpen"] is False


def test_envoy_config_validates_with_envoy():
    envoy = shutil.which("envoy") or find_envoy()
    result = subprocess.run([envoy, "--mode", "validate", "-c", str(ENVOY_CONFIG)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK" in result.stdout + result.stderr
    clusters = {c["name"]: c for c in
                yaml.safe_load(ENVOY_CONFIG.read_text())["static_resources"]["clusters"]}
    callout = clusters["calloutkit"]
    (endpoint,) = callout["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    service = manifests()["Service"]
    assert address["address"].split(".")[0] == service["metadata"]["name"]
    assert address["port_value"] == service["spec"]["ports"][0]["port"] == DEFAULT_PLAINTEXT_PORT
    assert callout["health_checks"][0]["grpc_health_check"] == {}
    assert callout["outlier_detection"]


# -- the image's command, outside a container --------------------------------------------------

def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in instructions(DOCKERFILE.read_text()):
        if word == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    env.pop("PATH")  # the image's venv; here, this one
    return env


def image_command() -> tuple[list[str], str]:
    """The image's ENTRYPOINT + CMD, and the server folder its build copies (ARG SERVER)."""
    steps = instructions(DOCKERFILE.read_text())
    entrypoint = [json.loads(args) for word, args in steps if word == "ENTRYPOINT"][-1]
    cmd = [json.loads(args) for word, args in steps if word == "CMD"][-1]
    (server,) = [args.partition("=")[2] for word, args in steps
                 if word == "ARG" and args.startswith("SERVER=")]
    return entrypoint + cmd, server


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_image_command_serves_probes_and_drains(tmp_path):
    command, server = image_command()
    shutil.copytree(ROOT / server, tmp_path / command[-1])  # COPY ${SERVER} ./server/
    grpc_port, health_port = free_port(), free_port()
    env = {**dockerfile_env(), **deployment_env(),
           "CALLOUTKIT_PLAINTEXT_PORT": str(grpc_port),
           "CALLOUTKIT_HEALTH_CHECK_PORT": str(health_port),
           "CALLOUTKIT_DEFAULT_IP": "127.0.0.1"}
    process = spawn([str(BIN / command[0]), *command[1:]], env=env, cwd=str(tmp_path))
    try:
        path = container()["readinessProbe"]["httpGet"]["path"]
        deadline = time.monotonic() + 30
        while True:
            try:
                if http_status(f"http://127.0.0.1:{health_port}{path}") == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "the health port never answered 200"
            time.sleep(0.1)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:  # the liveness probe
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # The image's own HEALTHCHECK command, as Docker would run it.
        (check,) = [args for word, args in instructions(DOCKERFILE.read_text())
                    if word == "HEALTHCHECK"]
        probe = json.loads(check.partition(" CMD ")[2])
        assert probe[0] == "python"
        done = subprocess.run([sys.executable, *probe[1:]], env={**os.environ, **env},
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr

        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=float(env["CALLOUTKIT_GRACE_PERIOD"]) + 10)
        assert process.returncode == 0, output
    finally:
        stop_process(process)
    records = [json.loads(line) for line in output.splitlines()]  # CALLOUTKIT_LOG_FORMAT=json
    assert any(r["message"] == "stopped" for r in records)
