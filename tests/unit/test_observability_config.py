"""Prometheus configs, rules and Grafana dashboards, checked offline.

promtool checks the configs and rules and runs the rule unit tests; the
dashboards are checked for structure, for PromQL that parses (promtool again)
and for using the recording rules. Whether every panel has data is the
integration test's job (tests/integration/test_observability.py).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from services.launcher import configs
from services.launcher.plan import Ports, build_plan

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "observability"
PROM = OBS / "prometheus"
RULES = sorted((PROM / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))
DASHBOARDS = sorted((OBS / "grafana" / "dashboards").glob("*.json"))
PROVISIONING = OBS / "grafana" / "provisioning"
GRAFANA_VARS = {"__rate_interval": "1m", "__range": "1h", "__interval": "15s"}


def render_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("observability_render", OBS / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def rules_of(kind: str) -> list[dict[str, Any]]:
    return [rule for path in RULES for group in load_yaml(path)["groups"]
            for rule in group["rules"] if kind in rule]


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def dashboards() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, json.loads(p.read_text(encoding="utf-8"))) for p in DASHBOARDS]


def exprs() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) of every panel target."""
    return [(name, panel["title"], target["expr"])
            for name, board in dashboards()
            for panel in panels(board["panels"])
            for target in panel.get("targets", [])]


# -- Prometheus --------------------------------------------------------------------


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in load_yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in rules_of("alert")}
    assert {"LLMMeshModelDown", "LLMMeshErrorRatioHigh", "LLMMeshLatencyP99High",
            "LLMMeshBackendQueueGrowing"} <= alerts
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"


def test_every_alert_says_what_and_how_bad() -> None:
    for rule in rules_of("alert"):
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_committed_configs_are_fresh() -> None:
    for path, text in render_module().rendered().items():
        assert path.read_text(encoding="utf-8") == text, f"{path.name} is stale: run `make gen`"


def test_launcher_renders_the_committed_local_config(tmp_path: Path) -> None:
    plan = build_plan(
        root=ROOT, run_dir=tmp_path, host="127.0.0.1", ports=Ports(),
        backends={"qwen2": "http://127.0.0.1:8081", "llama3": "http://127.0.0.1:8082"},
        model_path=None, threads=1, max_concurrent_requests=4, prometheus=False,
    )
    rendered = configs.prometheus_config(plan)
    committed = load_yaml(PROM / "prometheus.local.yml")
    # Only the rules' path differs: absolute for the launcher, which writes to .run/.
    assert rendered["rule_files"] == [str(PROM / "rules" / "*.yml")]
    assert {**rendered, "rule_files": committed["rule_files"]} == committed


def test_only_backends_get_a_model_target_label() -> None:
    # A target label named like a label of the scraped metrics would rename
    # those to exported_model: only TGI's metrics lack `model`.
    for name in ("prometheus.local.yml", "prometheus.compose.yml"):
        for job in load_yaml(PROM / name)["scrape_configs"]:
            labelled = any("model" in s.get("labels", {}) for s in job["static_configs"])
            assert labelled == (job["job_name"] == "backend"), (name, job["job_name"])


# -- Grafana -----------------------------------------------------------------------


def test_provisioning_points_at_the_dashboards_and_the_datasource() -> None:
    datasources = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    (source,) = datasources
    assert source["type"] == "prometheus" and source["isDefault"]
    assert source["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(PROVISIONING / "dashboards" / "dashboards.yml")["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    for name, board in dashboards():
        (var,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
        assert var["name"] == "datasource" and var["query"] == "prometheus", name
        assert var["current"]["value"] == source["uid"], name


def test_dashboards_are_well_formed() -> None:
    uids = [board["uid"] for _, board in dashboards()]
    assert len(uids) == len(set(uids)) == len(DASHBOARDS) >= 2
    for name, board in dashboards():
        defined = {v["name"] for v in board["templating"]["list"]} | set(GRAFANA_VARS)
        ids = [p["id"] for p in panels(board["panels"])]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for panel in panels(board["panels"]):
            where = f"{name} / {panel['title']}"
            pos = panel["gridPos"]
            assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, where
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == "${datasource}", where
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), where
            for target in panel["targets"]:
                used = set(re.findall(r"\$\{?(\w+)\}?", target["expr"]))
                assert used <= defined, f"{where}: undefined variables {used - defined}"


def test_models_dashboard_covers_the_guides_monitoring_list() -> None:
    text = " ".join(expr for name, _, expr in exprs() if name == "llmmesh.json")
    for needed in (
        "llmmesh_requests_total",  # total requests
        "p95_rate5m", "p99_rate5m",  # latency P95/P99
        "llmmesh_input_tokens_total", "llmmesh_output_tokens_total",  # tokens per model
        "sum by (model, reason) (rate(llmmesh_errors_total",  # errors by kind
        "llmmesh_time_to_first_token_seconds", "llmmesh_in_flight_requests",
        "llmmesh_backend_up",
    ):
        assert needed in text, needed
    assert any(name == "envoy-edge.json" for name, _ in dashboards())


def test_panels_use_the_recording_rules() -> None:
    recorded = {rule["record"] for rule in rules_of("record")}
    used = " ".join(expr for _, _, expr in exprs())
    used += " ".join(str(rule["expr"]) for rule in rules_of("alert") + rules_of("record"))
    unused = {name for name in recorded if name not in used}
    assert unused == set(), "recording rules nobody reads"
    for name, title, expr in exprs():
        # What a recording rule already computes is not computed again.
        assert not re.search(r"llmmesh_request_duration_seconds_bucket\{[^}]*router", expr), (
            name, title)


