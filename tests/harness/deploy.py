"""The deployment files read as data, for the tests of tests/unit/deploy,
tests/programs/test_deploy_tools.py and the tracing tests: docker-compose.yml
loaded as `docker compose` loads it (profiles, variables), each service's
flags, environment, ports and mounts, the Dockerfile's stages, and the
Kubernetes kustomizations."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import yaml

from services.adapter import __main__ as adapter_main
from services.cpu_backend import __main__ as cpu_backend_main
from services.router import __main__ as router_main

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parents[1] / "data"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = {
    "base": K8S / "base",
    "cpu": K8S / "overlays" / "cpu",
    "vllm-qwen2": K8S / "overlays" / "vllm-qwen2",
}
PROFILES = ("gpu", "cpu")
K8S_VERSION = "1.37.0"
TGI = json.loads((DATA / "tgi-launcher-3.3.5.json").read_text(encoding="utf-8"))
PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
    "version"
]


# ---------------------------------------------------------------------------
# Compose: loading as `docker compose` does
# ---------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|([A-Za-z_]\w*))")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's interpolation: $$, $VAR, ${VAR}, ${VAR-default}, ${VAR:-default}."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3)
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    if re.search(r"\$\{[^}]*:\?", value):
        raise AssertionError(f"unsupported interpolation in {value!r}")
    return _VARIABLE.sub(sub, value)


@cache
def compose() -> dict[str, Any]:
    """docker-compose.yml as compose sees it with no variables set."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return interpolate(raw, {})


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def enabled(profile: str) -> dict[str, dict[str, Any]]:
    return {
        n: s for n, s in services().items() if not s.get("profiles") or profile in s["profiles"]
    }


def names_in(profile: str) -> dict[str, str]:
    """DNS name -> service, as the default network of `profile` resolves them."""
    out: dict[str, str] = {}
    for name, svc in enabled(profile).items():
        aliases = (svc.get("networks") or {}).get("default", {}) or {}
        for dns in (name, *aliases.get("aliases", [])):
            assert dns not in out, f"{profile}: {dns} names both {out[dns]} and {name}"
            out[dns] = name
    return out


def env_of(svc: Mapping[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def flags(argv: list[str]) -> dict[str, str | bool]:
    """`--name value`, `--name=value` and bare `--switch` tokens of a command line."""
    out: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        assert token.startswith("--"), f"unexpected argument {token!r} in {argv}"
        name, eq, value = token[2:].partition("=")
        if eq:
            out[name] = value
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[name] = argv[i + 1]
            i += 1
        else:
            out[name] = True
        i += 1
    return out


@contextlib.contextmanager
def process_env(env: Mapping[str, str]) -> Iterator[None]:
    """os.environ as a container with exactly `env` (of the mesh's variables) sees it;
    the root logger, which the services' parse_args reconfigure, is restored after."""
    saved_env = dict(os.environ)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        for key in list(os.environ):
            if key.startswith(("LLMMESH_", "TGI_", "ENGINE_")) or key.endswith("_ADAPTERS"):
                del os.environ[key]
        os.environ.update(env)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def adapter_settings(env: Mapping[str, str]) -> adapter_main.AdapterSettings:
    with process_env(env):
        return adapter_main.parse_args([])


def router_settings(env: Mapping[str, str]) -> router_main.RouterSettings:
    with process_env(env):
        return router_main.parse_args([])


def is_cpu_backend(argv: list[str]) -> bool:
    return argv[:3] == ["python", "-m", "services.cpu_backend"]


def is_tgi(svc: Mapping[str, Any]) -> bool:
    return str(svc.get("image", "")).startswith("ghcr.io/huggingface/text-generation-inference:")


def is_vllm(svc: Mapping[str, Any]) -> bool:
    return str(svc.get("image", "")).startswith("vllm/vllm-openai:")


def listening_ports(svc: Mapping[str, Any]) -> set[int]:
    """The ports a compose service listens on, from its real configuration."""
    command = svc.get("command") or []
    image = str(svc.get("image", ""))
    if is_tgi(svc):
        return {int(flags(command).get("port", 80))}
    if is_vllm(svc):
        return {int(flags(command[1:]).get("port", 8000))}
    if is_cpu_backend(command):
        return {cpu_backend_main.parse_args(command[3:]).port}
    if image.startswith("envoyproxy/envoy:"):
        config = envoy_config_of(svc)
        admin = config["admin"]["address"]["socket_address"]["port_value"]
        listeners = {
            lst["address"]["socket_address"]["port_value"]
            for lst in config["static_resources"]["listeners"]
        }
        return {admin, *listeners}
    if image.startswith("prom/prometheus:"):
        return {9090}
    if image.startswith("grafana/grafana:"):
        return {3000}
    if image.startswith(("otel/opentelemetry-collector", "grafana/tempo:")):
        return otel_ports(svc)
    env = env_of(svc)
    if "LLMMESH_MODEL" in env:
        server = adapter_settings(env).server
    else:
        router = router_settings(env)
        server = router.server
        if router.openai is not None:
            return {server.port, router.openai.port,
                    *([server.metrics_port] if server.metrics_port else [])}
    return {server.port, *([server.metrics_port] if server.metrics_port else [])}


def otel_ports(svc: Mapping[str, Any]) -> set[int]:
    """Ports of the collector's or Tempo's OTLP receivers and HTTP server, from
    the config file the service mounts and runs with."""
    command = svc["command"]
    flag = next(a for a in command if a.startswith(("--config=", "-config.file=")))
    config = yaml.safe_load(bind_mounts(svc)[flag.split("=", 1)[1]].read_text(encoding="utf-8"))
    receivers = config.get("receivers") or config["distributor"]["receivers"]
    endpoints = [
        protocol["endpoint"]
        for protocol in receivers["otlp"]["protocols"].values()
    ]
    endpoints += [e["endpoint"] for e in (config.get("extensions") or {}).values()]
    ports = {int(e.rsplit(":", 1)[1]) for e in endpoints}
    if "server" in config:
        ports.add(int(config["server"]["http_listen_port"]))
    return ports


def bind_mounts(svc: Mapping[str, Any]) -> dict[str, Path]:
    """container path -> repository path of a service's bind mounts."""
    out = {}
    for volume in svc.get("volumes") or []:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = (ROOT / source).resolve()
    return out


def envoy_config_of(svc: Mapping[str, Any]) -> dict[str, Any]:
    mounts = bind_mounts(svc)
    command = svc["command"]
    path = mounts[command[command.index("-c") + 1]]
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def resolve(profile: str, url_or_address: str) -> tuple[str, int]:
    """(service, port) that `http://host:port`, `dns:///host:port` or `host:port` reaches."""
    text = url_or_address.removeprefix("dns:///")
    if "://" not in text:
        text = f"tcp://{text}"
    parts = urlsplit(text)
    assert parts.hostname and parts.port, f"no host:port in {url_or_address!r}"
    names = names_in(profile)
    assert parts.hostname in names, (
        f"{profile}: {parts.hostname} is no service or alias ({sorted(names)})"
    )
    return names[parts.hostname], parts.port


def assert_reaches(profile: str, address: str, *, what: str) -> str:
    service, port = resolve(profile, address)
    ports = listening_ports(enabled(profile)[service])
    assert port in ports, f"{profile}: {what} uses {address}, but {service} listens on {ports}"
    return service


def check_tgi_args(name: str, argv: list[str]) -> dict[str, str | bool]:
    f = flags(argv)
    unknown = set(f) - set(TGI["flags"])
    assert not unknown, f"{name}: TGI 3.3.5's launcher has no {sorted(unknown)}"
    for flag, values in TGI["values"].items():
        if flag in f:
            assert f[flag] in values, f"{name}: --{flag} {f[flag]}"
    assert f.get("quantize") == "gptq"
    max_input, max_total = int(f["max-input-tokens"]), int(f["max-total-tokens"])
    assert 0 < max_input < max_total, f"{name}: TGI refuses max-input >= max-total"
    # Without chunked prefill TGI refuses a prefill budget below max-input.
    assert int(f["max-batch-prefill-tokens"]) >= max_input
    fraction = float(f.get("cuda-memory-fraction", 1.0))
    assert 0 < fraction <= 1
    return f


# ---------------------------------------------------------------------------
# Dockerfile and .dockerignore
# ---------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]]

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


@cache
def dockerfile_stages() -> dict[str, Stage]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and current is None:
            key, _, value = rest.partition("=")
            args[key] = value
        elif keyword == "FROM":
            image, _, name = rest.partition(" AS ")
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
            current = Stage(name.strip(), image, [])
            stages[current.name] = current
        else:
            assert current is not None, line
            current.instructions.append((keyword, rest))
    return stages


def stage_chain(name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    stages = dockerfile_stages()
    chain = [stages[name]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return chain


def image_gguf_path() -> str:
    """Where the cpu-backend image links the SmolLM2 GGUF."""
    run = " ".join(stage_chain("cpu-backend")[0].all("RUN"))
    (path,) = set(re.findall(r"(/app/models/gguf/\S+\.gguf)", run))
    return path


# ---------------------------------------------------------------------------
# models/download.sh
# ---------------------------------------------------------------------------


def download_folders() -> set[str]:
    text = (ROOT / "models" / "download.sh").read_text(encoding="utf-8")
    block = text.split("MODELS=(", 1)[1].split(")", 1)[0]
    return {line.split()[2] for line in re.findall(r'"([^"]+)"', block)}


def k8s_errors(doc: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}"
    return None


# ---------------------------------------------------------------------------
# The vllm profile and overlay: Qwen2 on vLLM's OpenAI server beside TGI
# ---------------------------------------------------------------------------

# `vllm serve` flags used here: EngineArgs fields of vLLM 0.11
# (vllm/engine/arg_utils.py) and the server's own (vllm/entrypoints/openai/
# cli_args.py), each spelled --kebab-case.
VLLM_FLAGS = {
    "served-model-name", "quantization", "max-model-len", "max-num-seqs",
    "max-num-batched-tokens", "gpu-memory-utilization", "enforce-eager", "kv-cache-dtype",
    "host", "port", "download-dir",
}
VLLM_QUANTIZATIONS = {"gptq", "gptq_marlin"}


def check_vllm_args(name: str, argv: list[str]) -> dict[str, str | bool]:
    model, *rest = argv
    assert not model.startswith("--"), f"{name}: the image runs `vllm serve MODEL ...`"
    f = flags(rest)
    unknown = set(f) - VLLM_FLAGS
    assert not unknown, f"{name}: flags not checked against vLLM: {sorted(unknown)}"
    assert f["quantization"] in VLLM_QUANTIZATIONS, name
    utilization = float(f["gpu-memory-utilization"])
    assert 0 < utilization <= 1, name
    return f
