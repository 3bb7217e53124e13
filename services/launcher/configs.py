"""Config files the local mesh needs, rendered for the plan's ports: Envoy's
(from envoy/envoy.template.yaml) and Prometheus' scrape config; and the
banner `make up` prints once everything is ready."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from services.launcher.plan import Plan

ROOT = Path(__file__).resolve().parents[2]
DESCRIPTOR = ROOT / "gen" / "llmmesh.binpb"
RULES_DIR = ROOT / "observability" / "prometheus" / "rules"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _envoy_render() -> ModuleType:
    return _load("envoy_render", ROOT / "envoy" / "render.py")


def _observability_render() -> ModuleType:
    return _load("observability_render", ROOT / "observability" / "render.py")


def envoy_config(plan: Plan) -> str:
    render = _envoy_render()
    edge: dict[str, int] = {}
    if plan.max_in_flight_total is not None:
        edge["EDGE_MAX_REQUESTS"] = render.edge_max_requests(plan.max_in_flight_total)
    text = str(render.render(
        ADMIN_ADDRESS=plan.host, ADMIN_PORT=plan.ports.admin,
        LISTEN_ADDRESS=plan.host, LISTEN_PORT=plan.ports.envoy,
        ROUTER_HOST=plan.host, ROUTER_PORT=plan.ports.router, OPENAI_PORT=plan.ports.openai,
        ROUTER_DISCOVERY="STATIC", DESCRIPTOR=DESCRIPTOR, **edge,
        # The OTEL_* variables that the other processes inherit turn on Envoy's tracer too.
        otel=os.environ,
    ))
    if plan.tls is None:
        return text
    tls = plan.tls
    return str(render.with_tls(
        text, cert=str(tls.cert("envoy")), key=str(tls.key("envoy")), ca=str(tls.ca)
    ))


def prometheus_config(plan: Plan, rules_dir: Path = RULES_DIR) -> dict[str, Any]:
    """Scrape every process of the plan, with observability/render.py's jobs and
    the rules of observability/prometheus/rules."""
    host, ports = plan.host, plan.ports
    engines: dict[str, list[str]] = {}
    for replica in plan.replicas:
        engines.setdefault(replica.model, []).append(_hostport(replica.engine_url))
    config: dict[str, Any] = _observability_render().prometheus_config(
        router=f"{host}:{ports.metrics}",
        adapters=[f"{host}:{r.metrics_port}" for r in plan.replicas],
        envoy=f"{host}:{ports.admin}",
        backends={m: targets[0] for m, targets in engines.items()},
        rule_files=[str(rules_dir / "*.yml")],
    )
    # Every replica's engine, labelled with its model.
    for job in config["scrape_configs"]:
        if job["job_name"] == "backend":
            for group in job["static_configs"]:
                group["targets"] = engines[group["labels"]["model"]]
    return config


def _hostport(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0]


def write(plan: Plan) -> None:
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    (plan.run_dir / "envoy.yaml").write_text(envoy_config(plan), encoding="utf-8")
    (plan.run_dir / "prometheus.yml").write_text(
        _observability_render().dump(prometheus_config(plan)), encoding="utf-8"
    )


def shown(path: Path) -> str:
    """A path as a person in the checkout would type it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def tool(name: str) -> str:
    """How to call a program of this interpreter's venv, which need not be active."""
    return shown(Path(sys.executable).parent / name)


def banner(plan: Plan) -> str:
    host, ports = plan.host, plan.ports
    base = f"{plan.scheme}://{host}:{ports.envoy}"
    lines = [
        "",
        "llmmesh is up.",
        f"  HTTP/JSON and gRPC  {base}   (Envoy; admin http://{host}:{ports.admin})",
        f"  router (gRPC)       {host}:{ports.router}   metrics http://{host}:{ports.metrics}/metrics",
        f"  playground          {base}/   (open it in a browser)",
        f"  OpenAI API          {base}/v1   (router's listener {host}:{ports.openai})",
    ]
    for replica in plan.replicas:
        engine = replica.engine_url + (
            " (CPU backend, SmolLM2-135M-Instruct)" if replica.cpu
            else "" if replica.kind == "tgi" else f" ({replica.kind})")
        lines.append(f"  {replica.model:<8} adapter {replica.adapter} -> {engine}")
    cpu = [f"{r.engine_url}/metrics" for r in plan.replicas if r.cpu]
    if len(cpu) > len({r.model for r in plan.replicas if r.cpu}):
        # Several replicas of a model: where the load test reads their cache hits.
        lines.append(f"  engines' /metrics   {','.join(cpu)}   (tools.loadtest --cache-metrics)")
    if plan.prometheus:
        lines.append(f"  Prometheus          http://{host}:{ports.prometheus}")
    else:
        lines.append("  Prometheus          not running (see the note above)"
                     if plan.notes else "  Prometheus          off (--no-prometheus)")
    lines += [f"  logs                {shown(plan.log_dir)}/", ""]
    curl, grpcurl = "curl", f"{tool('grpcurl')} -plaintext"
    if plan.tls is not None:
        ca = shown(plan.tls.ca)
        curl, grpcurl = f"curl --cacert {ca}", f"{tool('grpcurl')} -cacert {ca}"
        lines += [
            f"TLS: HTTPS and gRPC over TLS on :{ports.envoy}, certificates signed by the "
            f"development CA {ca};",
            "mutual TLS between Envoy, router and adapters (a client of the router needs "
            f"{shown(plan.tls.cert('client'))} and its key).",
            "",
        ]
    header = ""
    if plan.api_keys_file is not None:
        keys = shown(plan.api_keys_file)
        lines += [
            f"API keys are required ({keys}): every call sends `Authorization: Bearer <key>`.",
            f"  KEY=$(awk 'NF && !/^#/ {{print $1; exit}}' {keys})",
        ]
        header = ' -H "Authorization: Bearer $KEY"'
        grpcurl += ' -H "authorization: Bearer $KEY"'
    lines += [
        "Try:" if not header else "Then try:",
        f"  {curl} {base}/v1/generate -X POST -H 'Content-Type: application/json'{header} \\",
        """    -d '{"model_id": "qwen2", "inputs": "Hello!", """
        """"parameters": {"max_new_tokens": 64}}'""",
        f"  {curl} -N {base}/v1/generate_stream -X POST{header} \\",
        """    -d '{"model_id": "llama3", "inputs": "Tell me a joke.", "scenario": "qa"}'""",
        f"  {grpcurl} {host}:{ports.envoy} list",
        "",
        "A process that dies is started again; Ctrl-C stops everything.",
    ]
    return "\n".join(lines)
