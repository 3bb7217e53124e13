"""Tracing configuration, checked without running the mesh: the OTEL_*
variables, tracing off costing nothing, Envoy's tracer as envoy/render.py
and the launcher write it (validated by the real Envoy), and the compose
stack (collector, Tempo, Grafana datasource) wired to what listens.
The spans of real requests are tests/integration/test_tracing.py's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common import logs, tracing
from services.common.tracing import TracingSettings
from services.launcher import configs
from services.launcher.plan import Ports, build_plan
from tests.unit import test_deploy as deploy

ROOT = Path(__file__).resolve().parents[2]
ENVOY = Path(sys.executable).parent / "envoy"
sys.path.insert(0, str(ROOT / "envoy"))
import render  # noqa: E402  (envoy/render.py)

# -- the OTEL_* variables --------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "endpoint", "protocol"),
    [
        ({}, None, "http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://c:4318", "http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
         "http://c:4317", "grpc"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/v1/traces",
          "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://t:1/v1/traces",
         "http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"},
         None, "http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"},
         None, "http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
         None, "grpc"),
    ],
)
def test_settings_follow_the_standard_variables(
    env: dict[str, str], endpoint: str | None, protocol: str
) -> None:
    settings = TracingSettings.from_env(env, "router")
    assert (settings.endpoint, settings.protocol) == (endpoint, protocol)
    assert settings.enabled is (endpoint is not None)


def test_an_unknown_protocol_stops_the_service_with_a_clear_message() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "json"}
    with pytest.raises(SystemExit, match="grpc, http/protobuf"):
        TracingSettings.from_env(env, "router")


def test_off_installs_nothing() -> None:
    assert not tracing.setup("router", {}).enabled
    assert not tracing.enabled()
    assert tracing.server_interceptors() == []
    assert tracing.client_interceptors("127.0.0.1:1") == []
    assert tracing.http_client_tracing() == []
    assert tracing.http_server_middlewares() == []
    assert logs.context_fields is None


def test_off_imports_no_opentelemetry() -> None:
    """Tracing off costs nothing at start either: no OpenTelemetry module is loaded
    by the services, their servers, clients and backends."""
    code = (
        "import sys\n"
        "import services.router.__main__, services.adapter.__main__\n"
        "import services.cpu_backend.server, services.launcher.configs\n"
        "from services.common import tracing\n"
        "tracing.setup('router')\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_on_logs_carry_the_trace_and_spans_reach_the_exporter() -> None:
    """In a subprocess (the tracer provider is global): setup with an endpoint
    turns on the hooks, and a log line written under a span carries its ids."""
    code = (
        "import json, logging, sys\n"
        "from services.common import logs, tracing\n"
        "logs.setup('router')\n"
        "assert tracing.setup('router').enabled\n"
        "assert len(tracing.client_interceptors('127.0.0.1:1')) == 2\n"
        "assert len(tracing.server_interceptors()) == 1\n"
        "assert len(tracing.http_client_tracing()) == 1\n"
        "with tracing.tracer().start_as_current_span('x') as span:\n"
        "    logging.getLogger('t').info('inside')\n"
        "    ctx = span.get_span_context()\n"
        "logging.getLogger('t').info('outside')\n"
        "print(format(ctx.trace_id, '032x'), format(ctx.span_id, '016x'))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    # Nothing listens there: the export fails quietly, the service goes on.
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", OTEL_EXPORTER_OTLP_TIMEOUT="200")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60, check=True)
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    (ids,) = [x for x in done.stdout.splitlines() if x and not x.startswith("{")]
    trace_id, span_id = ids.split()
    inside = next(x for x in lines if x["msg"] == "inside")
    outside = next(x for x in lines if x["msg"] == "outside")
    assert (inside["trace_id"], inside["span_id"]) == (trace_id, span_id)
    assert "trace_id" not in outside


# -- Envoy's tracer ----------------------------------------------------------------------


def tracer_of(config: dict[str, Any]) -> dict[str, Any]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    return dict(hcm["typed_config"]["tracing"])


def clusters_of(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def validate(text: str, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    done = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_envoy_has_no_tracer_without_an_endpoint() -> None:
    config = yaml.safe_load(render.render())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    assert "tracing" not in hcm["typed_config"]
    assert render.OTLP_CLUSTER not in clusters_of(config)
    assert "layered_runtime" not in config


def test_envoy_exports_over_grpc(tmp_path: Path) -> None:
    text = render.render(otel={
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.example:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=a%20b,authorization=Bearer%20k",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
        "OTEL_BSP_SCHEDULE_DELAY": "250",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "64",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
    }, DESCRIPTOR=str(ROOT / "gen" / "llmmesh.binpb"))
    validate(text, tmp_path)
    config = yaml.safe_load(text)
    tracer = tracer_of(config)
    typed = tracer["provider"]["typed_config"]
    service = typed["grpc_service"]
    assert service["envoy_grpc"]["cluster_name"] == render.OTLP_CLUSTER
    assert service["timeout"] == "2.5s"
    assert service["initial_metadata"] == [
        {"key": "x-tenant", "value": "a b"}, {"key": "authorization", "value": "Bearer k"}]
    assert typed["service_name"] == "envoy"
    assert tracer["random_sampling"]["value"] == 25.0
    cluster = clusters_of(config)[render.OTLP_CLUSTER]
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert address["address"]["socket_address"] == {"address": "collector.example",
                                                     "port_value": 4317}
    assert "http2_protocol_options" in json.dumps(cluster)
    runtime = config["layered_runtime"]["layers"][0]["static_layer"]
    assert runtime == {"tracing.opentelemetry.flush_interval_ms": 250,
                       "tracing.opentelemetry.min_flush_spans": 64}


@pytest.mark.parametrize(
    ("env", "uri"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://c:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c/base/"}, "https://c:443/base/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:9/custom"}, "http://t:9/custom"),
    ],
)
def test_envoy_exports_over_http(env: dict[str, str], uri: str, tmp_path: Path) -> None:
    text = render.render(otel=env, DESCRIPTOR=str(ROOT / "gen" / "llmmesh.binpb"))
    validate(text, tmp_path)
    config = yaml.safe_load(text)
    http = tracer_of(config)["provider"]["typed_config"]["http_service"]
    assert http["http_uri"]["uri"] == uri
    cluster = clusters_of(config)[render.OTLP_CLUSTER]
    assert ("transport_socket" in cluster) is uri.startswith("https")
    assert "http2_protocol_options" not in json.dumps(cluster)


def test_the_launcher_passes_its_otel_variables_to_envoy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = build_plan(root=ROOT, run_dir=tmp_path, host="127.0.0.1", ports=Ports(),
                      backends={"qwen2": "http://h:1", "llama3": "http://h:2"},
                      model_path=None, threads=1, max_concurrent_requests=None,
                      prometheus=False)
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(key)
    hcm = yaml.safe_load(configs.envoy_config(plan))["static_resources"]["listeners"][0]
    assert "tracing" not in hcm["filter_chains"][0]["filters"][0]["typed_config"]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    text = configs.envoy_config(plan)
    validate(text, tmp_path)
    assert tracer_of(yaml.safe_load(text))["provider"]["name"] == "envoy.tracers.opentelemetry"


# -- compose: collector, Tempo, Grafana --------------------------------------------------


def test_compose_envoy_exports_to_the_collector() -> None:
    for profile in deploy.PROFILES:
        config = deploy.envoy_config_of(deploy.enabled(profile)["envoy"])
        endpoint = clusters_of(config)[render.OTLP_CLUSTER]["load_assignment"]["endpoints"][0]
        address = endpoint["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        target = deploy.assert_reaches(
            profile, f"{address['address']}:{address['port_value']}", what="envoy tracer")
        assert target == "otel-collector"
        assert "grpc_service" in tracer_of(config)["provider"]["typed_config"]


def test_every_mesh_process_exports_to_the_collector() -> None:
    for profile in deploy.PROFILES:
        for name, svc in deploy.enabled(profile).items():
            if deploy.is_tgi(svc):
                flags = deploy.flags(svc["command"])
                endpoint = str(flags["otlp-endpoint"])
                assert flags["otlp-service-name"] == name
            elif svc.get("build"):  # our own images: router, adapters, CPU backends
                env = deploy.env_of(svc)
                settings = TracingSettings.from_env(env, name)
                assert settings.enabled and settings.protocol == "grpc", name
                endpoint = str(settings.endpoint)
            else:
                continue
            target = deploy.assert_reaches(profile, endpoint, what=f"{name} traces")
            assert target == "otel-collector", name
            assert endpoint.endswith(":4317")


def load(path: str) -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / path).read_text(encoding="utf-8")))


def test_the_collector_pipeline_is_complete_and_reaches_tempo() -> None:
    config = load("observability/otel/collector.yaml")
    pipeline = config["service"]["pipelines"]["traces"]
    for kind in ("receivers", "processors", "exporters"):
        for name in pipeline[kind]:
            assert name in config[kind], f"{kind}: {name} is not defined"
    for name in config["service"]["extensions"]:
        assert name in config["extensions"]
    assert pipeline["processors"][0] == "memory_limiter", "the limiter goes first"
    assert set(config["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    (exporter,) = pipeline["exporters"]
    for profile in deploy.PROFILES:
        target = deploy.assert_reaches(
            profile, config["exporters"][exporter]["endpoint"], what="collector")
        assert target == "tempo"


def test_grafana_reads_tempo() -> None:
    datasources = load("observability/grafana/provisioning/datasources/tempo.yml")
    (tempo,) = [d for d in datasources["datasources"] if d["type"] == "tempo"]
    for profile in deploy.PROFILES:
        assert deploy.assert_reaches(profile, tempo["url"], what="grafana tempo") == "tempo"
    grafana = deploy.services()["grafana"]
    assert grafana["depends_on"]["tempo"]["condition"] == "service_healthy"
    uids = [d["uid"] for path in (ROOT / "observability/grafana/provisioning/datasources")
            .glob("*.yml") for d in load(str(path.relative_to(ROOT)))["datasources"]]
    assert len(uids) == len(set(uids))


def test_tempo_stores_on_its_volume() -> None:
    svc = deploy.services()["tempo"]
    config = load("observability/tempo/tempo.yaml")
    volumes = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    storage = config["storage"]["trace"]
    assert storage["backend"] == "local"
    for path in (storage["wal"]["path"], storage["local"]["path"]):
        mount = next(m for m in volumes if path.startswith(m + "/"))
        assert volumes[mount] in deploy.compose()["volumes"], "a named volume keeps traces"
