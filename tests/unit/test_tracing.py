"""Tracing configuration, checked without running the mesh: the OTEL_*
variables, tracing off costing nothing, Envoy's tracer as envoy/render.py
and the launcher write it (validated by the real Envoy), and the compose
stack (collector, Tempo, Grafana datasource) wired to what listens.
The spans of real requests are tests/integration/test_tracing.py's."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common import logs, tracing
from services.common.tracing import TracingSettings
from tests.harness import deploy

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


# -- Envoy's tracer ----------------------------------------------------------------------


def tracer_of(config: dict[str, Any]) -> dict[str, Any]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    return dict(hcm["typed_config"]["tracing"])


def clusters_of(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def test_envoy_has_no_tracer_without_an_endpoint() -> None:
    config = yaml.safe_load(render.render())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    assert "tracing" not in hcm["typed_config"]
    assert render.OTLP_CLUSTER not in clusters_of(config)
    assert "layered_runtime" not in config


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
