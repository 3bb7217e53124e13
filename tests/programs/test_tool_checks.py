"""Committed configuration through the real validators: Envoy's
(`envoy --mode validate`) on every rendered config, tracing included, and
Prometheus's promtool on the scrape configs, the rules, the rules' unit
tests and every dashboard query."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scripts.otlp_receiver import OtlpReceiver
from services.launcher import configs
from services.launcher.plan import Ports, build_plan
from tests.harness.markers import find_program
from tests.harness.procs import ROOT
from tests.unit.test_observability_config import (
    GRAFANA_VARS,
    PROM,
    RULE_TESTS,
    RULES,
    exprs,
    render_module,
)
from tests.unit.test_tracing import clusters_of, tracer_of

sys.path.insert(0, str(ROOT / "envoy"))
import render

ENVOY = Path(sys.executable).parent / "envoy"
pytestmark = pytest.mark.needs("envoy")


@pytest.mark.parametrize("profile", ["local", "compose"])
def test_envoy_validates(profile, tmp_path):
    values = {**render.PROFILES[profile], "DESCRIPTOR": str(ROOT / "gen" / "llmmesh.binpb")}
    config = tmp_path / "envoy.yaml"
    config.write_text(render.render(**values))
    result = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(config)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Deprecated" not in result.stdout + result.stderr


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
    turns on the hooks, a log line written under a span carries its ids, and
    the span reaches a collector (an in-test OTLP/HTTP receiver) by exit."""
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
    receiver = OtlpReceiver()
    receiver.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{receiver.http_port}"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=60, check=True)
        exported = receiver.spans
    finally:
        receiver.stop()
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    (ids,) = [x for x in done.stdout.splitlines() if x and not x.startswith("{")]
    trace_id, span_id = ids.split()
    inside = next(x for x in lines if x["msg"] == "inside")
    outside = next(x for x in lines if x["msg"] == "outside")
    assert (inside["trace_id"], inside["span_id"]) == (trace_id, span_id)
    assert "trace_id" not in outside
    # The batch is exported at exit at the latest (the provider shuts down then).
    assert [(s["trace_id"], s["span_id"], s["name"], s["service"]) for s in exported] == [
        (trace_id, span_id, "x", "router")]


def validate(text: str, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    done = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


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


PROMTOOL = find_program("promtool")
needs_promtool = pytest.mark.needs("promtool")


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


@needs_promtool
@pytest.mark.parametrize("name", ["prometheus.local.yml", "prometheus.compose.yml"])
def test_committed_scrape_configs_pass_promtool(name: str) -> None:
    result = promtool("check", "config", PROM / name)
    assert result.returncode == 0, result.stdout + result.stderr
    # Rule files are found relative to the config, and all of them are loaded.
    assert f"SUCCESS: {len(RULES)} rule files found" in result.stdout


@needs_promtool
def test_rules_pass_promtool() -> None:
    result = promtool("check", "rules", *RULES)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", *RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_launcher_config_with_other_ports_passes_promtool(tmp_path: Path) -> None:
    plan = build_plan(
        root=ROOT, run_dir=tmp_path, host="127.0.0.1",
        ports=Ports(metrics=19464, admin=19901),
        backends={"qwen2": "http://gpu-a:8080", "llama3": "http://gpu-b:8080/"},
        model_path=None, threads=1, max_concurrent_requests=4, prometheus=False,
    )
    config = configs.prometheus_config(plan)
    jobs = {job["job_name"]: job["static_configs"] for job in config["scrape_configs"]}
    assert jobs["adapter"] == [{"targets": ["127.0.0.1:19465", "127.0.0.1:19466"]}]
    assert jobs["backend"] == [
        {"targets": ["gpu-a:8080"], "labels": {"model": "qwen2"}},
        {"targets": ["gpu-b:8080"], "labels": {"model": "llama3"}},
    ]
    path = tmp_path / "prometheus.yml"
    path.write_text(render_module().dump(config), encoding="utf-8")
    result = promtool("check", "config", path)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_every_panel_query_parses(tmp_path: Path) -> None:
    # promtool has no offline query parser; as recording rules, the panels'
    # queries go through the same parser Prometheus uses.
    rules = []
    for i, (name, title, expr) in enumerate(exprs()):
        for var, value in {**GRAFANA_VARS, "model": "qwen2|llama3"}.items():
            expr = expr.replace(f"${var}", value)
        rules.append({"record": f"panel:query_{i}", "expr": expr,
                      "labels": {"panel": f"{name}/{title}"}})
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
