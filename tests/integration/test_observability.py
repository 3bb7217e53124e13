"""Observability end to end, with real processes only.

Two TGI doubles stand in for the models; the launcher (`make up`) starts the
adapters, the router, Envoy and the real Prometheus in front of them, with
the rules of observability/prometheus/rules. A bounded mix of good, invalid
and failing requests goes through Envoy as an HTTP client would send it.
Then:

- every counter Prometheus holds equals what was sent (requests by outcome,
  errors by reason, tokens as the responses counted them, the backends' own
  counters, Envoy's status classes);
- EVERY panel query of EVERY dashboard in observability/grafana/dashboards,
  for each model and for all of them, returns data from this Prometheus;
- the rules evaluate without error, and the alerts fire on real series.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.harness.mesh import free_run
from tests.harness.procs import ROOT, free_port, python_module, start, stop, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.needs("prometheus")]

DASHBOARDS = sorted((ROOT / "observability" / "grafana" / "dashboards").glob("*.json"))
MODELS = ("qwen2", "llama3")
JOBS = 'job=~"router|adapter|envoy|backend"'
TARGETS = 2 + 2 * len(MODELS)  # router, envoy, an adapter and a backend per model
GEN = 'method=~"Generate|GenerateStream"'
# What Grafana would put in place of its own variables. $__rate_interval is
# wider than Grafana's (4 scrapes) so that quantiles still see the traffic
# while the test waits for every panel.
GRAFANA_VARS = {"__rate_interval": "2m", "__range": "10m", "__interval": "15s"}


# -- the processes -----------------------------------------------------------------


@dataclass
class Stack:
    http: str  # Envoy, http://host:port
    prometheus: str
    router_metrics: str
    doubles: dict[str, str]  # model -> URL
    launcher: subprocess.Popen[bytes]
    launcher_log: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def control(self, model: str, **state: Any) -> None:
        """Set the fault state of a model's TGI double ({} resets it)."""
        _post(f"{self.doubles[model]}/_control", state)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; the result vector."""
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = _get_json(url)
        assert body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", (expr, body["data"]["resultType"])
        return list(body["data"]["result"])

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def wait_scraped(self, after: float, timeout: float = 30.0) -> float:
        """Wait until every target was scraped after `after`; the oldest scrape time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            up = self.query(f"up{{{JOBS}}}")
            stamps = [float(s["value"][1]) for s in self.query(f"timestamp(up{{{JOBS}}})")]
            if (
                len(up) == TARGETS
                and all(s["value"][1] == "1" for s in up)
                and min(stamps) > after
            ):
                return min(stamps)
            time.sleep(0.5)
        raise TimeoutError(f"targets not all scraped after {after}: {up}")

    def wait_evaluated(self, after: float, timeout: float = 30.0) -> None:
        """Wait until the recording rules were evaluated after `after`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stamps = self.query("timestamp(model:llmmesh_requests:rate5m)")
            if stamps and min(float(s["value"][1]) for s in stamps) > after:
                return
            time.sleep(0.5)
        raise TimeoutError(f"recording rules not evaluated after {after}")


def _get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _post(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        resp.read()


def _all_ready(http: str) -> bool:
    try:
        models = _get_json(f"{http}/v1/mesh/models", timeout=2)["models"]
    except (OSError, ValueError, KeyError):
        return False
    return {m["id"] for m in models} == set(MODELS) and all(m["ready"] for m in models)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("observability")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        doubles = {}
        for model in MODELS:
            port = free_port()
            procs.append(start(
                python_module("tools.tgi_double", "--port", str(port),
                              "--model-id", f"double/{model}"),
                log_path=tmp / f"double-{model}.log",
            ))
            doubles[model] = f"http://127.0.0.1:{port}"
        for proc, url in zip(procs, doubles.values(), strict=True):
            wait_http(f"{url}/health", 30, proc)

        ports = {name: free_port() for name in ("envoy", "admin", "router", "prometheus")}
        adapters, metrics = free_run(len(MODELS)), free_run(1 + len(MODELS))
        log = tmp / "launcher.log"
        launcher = start(
            python_module(
                "services.launcher",
                "--backends", " ".join(f"{m}={u}" for m, u in doubles.items()),
                "--run-dir", str(tmp / "run"),
                "--envoy-port", str(ports["envoy"]), "--admin-port", str(ports["admin"]),
                "--router-port", str(ports["router"]), "--adapter-port", str(adapters),
                "--metrics-port", str(metrics), "--prometheus-port", str(ports["prometheus"]),
                "--openai-port", str(free_port()),
            ),
            # As on a terminal: the banner is in the log as soon as it is printed.
            env={"PYTHONUNBUFFERED": "1"},
            log_path=log,
        )
        stack = Stack(
            http=f"http://127.0.0.1:{ports['envoy']}",
            prometheus=f"http://127.0.0.1:{ports['prometheus']}",
            router_metrics=f"http://127.0.0.1:{metrics}/metrics",
            doubles=doubles, launcher=launcher, launcher_log=log, procs=procs,
        )
        try:
            deadline = time.monotonic() + 90
            while not _all_ready(stack.http):
                if launcher.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the mesh did not come up:\n" + log.read_text())
                time.sleep(0.3)
            # Envoy's readiness comes before Prometheus' in the launcher's stages.
            wait_http(f"{stack.prometheus}/-/ready", 30, launcher)
            yield stack
        finally:
            if launcher.poll() is None:
                launcher.send_signal(signal.SIGINT)  # it stops its children in order
                try:
                    launcher.wait(45)
                except subprocess.TimeoutExpired:
                    stop(launcher)
    finally:
        for proc in procs:
            stop(proc)


# -- the traffic -------------------------------------------------------------------


@dataclass
class Sent:
    """What the traffic was, as the clients saw it."""

    statuses: list[int] = field(default_factory=list)
    output_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MODELS, 0))
    input_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MODELS, 0))
    before: dict[str, dict[tuple[str, ...], float]] = field(default_factory=dict)
    after: dict[str, dict[tuple[str, ...], float]] = field(default_factory=dict)

    def delta(self, name: str) -> dict[tuple[str, ...], float]:
        """Counter increases during the traffic; series that did not move are left out."""
        before, after = self.before[name], self.after[name]
        out = {k: v - before.get(k, 0.0) for k, v in after.items()}
        return {k: v for k, v in out.items() if v}


# name -> (expression, the labels it is summed by)
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "router_requests": (
        f'llmmesh_requests_total{{service="router", {GEN}}}', ("model", "method", "code")),
    "adapter_requests": (
        f'llmmesh_requests_total{{service=~"adapter-.+", {GEN}}}', ("service", "method", "code")),
    "errors": ("llmmesh_errors_total", ("service", "model", "reason")),
    "output_tokens": ("llmmesh_output_tokens_total", ("service", "model")),
    "input_tokens": ("llmmesh_input_tokens_total", ("service", "model")),
    "durations": (
        f"llmmesh_request_duration_seconds_count{{{GEN}}}", ("service", "model", "method")),
    "ttft": ("llmmesh_time_to_first_token_seconds_count", ("service", "model")),
    "tpot": ("llmmesh_time_per_output_token_seconds_count", ("service", "model")),
    "backend_requests": ("tgi_request_count", ("model",)),
    "backend_failures": ("tgi_request_failure", ("model", "err")),
    "backend_tokens": ("tgi_request_generated_tokens_sum", ("model",)),
    "edge": (
        'envoy_http_downstream_rq_xx{envoy_http_conn_manager_prefix="edge"}',
        ("envoy_response_code_class",),
    ),
}


def snapshot(stack: Stack) -> dict[str, dict[tuple[str, ...], float]]:
    out = {}
    for name, (selector, by) in COUNTERS.items():
        result = stack.query(f"sum by ({', '.join(by)}) ({selector})")
        out[name] = {
            tuple(s["metric"].get(label, "") for label in by): float(s["value"][1])
            for s in result
        }
    return out


def _call(stack: Stack, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"{stack.http}{path}", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _generate(stack: Stack, sent: Sent, model: str, text: str, **extra: Any) -> int:
    body = {"model_id": model, "inputs": text, "parameters": {"max_new_tokens": 16}, **extra}
    status, raw = _call(stack, "/v1/generate", body)
    sent.statuses.append(status)
    if status == 200:
        reply = json.loads(raw)
        assert reply["model_id"] == model and reply["tokens"] > 0, reply
        sent.output_tokens[model] += reply["tokens"]
        sent.input_tokens[model] += reply["input_tokens"]
    return status


def _stream(stack: Stack, sent: Sent, model: str, text: str) -> None:
    body = {"model_id": model, "inputs": text, "parameters": {"max_new_tokens": 16}}
    status, raw = _call(stack, "/v1/generate_stream", body)
    sent.statuses.append(status)
    assert status == 200, raw
    events = [
        json.loads(line[len("data:"):])
        for line in raw.decode().splitlines()
        if line.startswith("data:")
    ]
    last = events[-1]
    # Text first (time to first token), a clean end last (its counts are the stream's).
    assert events[0]["text"] and last["tokens"] > 1, events
    assert last["finish_reason"] not in ("FINISH_REASON_UNSPECIFIED", "FINISH_REASON_ERROR")
    sent.output_tokens[model] += last["tokens"]
    sent.input_tokens[model] += last["input_tokens"]


GOOD_QWEN2, GOOD_LLAMA3, STREAMS, INVALID, UNKNOWN, FAILING = 10, 5, 2, 3, 2, 2


@pytest.fixture(scope="module")
def sent(stack: Stack) -> Sent:
    """Send the mix once; counters are snapshotted, after a fresh scrape, before
    and after it."""
    sent = Sent()
    sent.before = snapshot_after(stack, time.time())
    words = "one two three four five six"
    for i in range(GOOD_QWEN2):
        assert _generate(stack, sent, "qwen2", f"request {i}: {words}") == 200
    for i in range(GOOD_LLAMA3):
        assert _generate(stack, sent, "llama3", f"question {i}: {words}", scenario="qa") == 200
    for model in MODELS:
        for i in range(STREAMS):
            _stream(stack, sent, model, f"stream {i}: {words}")
    for _ in range(INVALID):  # the router rejects it; it never reaches a model
        assert _generate(stack, sent, "qwen2", words, parameters={"top_p": 1.0}) == 400
    for _ in range(UNKNOWN):
        assert _generate(stack, sent, "gpt-unknown", words) == 404
    stack.control("qwen2", mode="generation_error")
    try:
        for _ in range(FAILING):  # TGI 424 -> MODEL_ERROR -> INTERNAL -> HTTP 500
            assert _generate(stack, sent, "qwen2", words) == 500
    finally:
        stack.control("qwen2")
    sent.after = snapshot_after(stack, time.time())
    return sent


def snapshot_after(stack: Stack, after: float) -> dict[str, dict[tuple[str, ...], float]]:
    scraped = stack.wait_scraped(after)
    stack.wait_evaluated(scraped + 0.5)
    return snapshot(stack)


# -- counters equal what was sent --------------------------------------------------


def test_requests_are_counted_once_by_outcome(sent: Sent) -> None:
    good = GOOD_QWEN2 + GOOD_LLAMA3 + STREAMS * len(MODELS)
    assert len(sent.statuses) == good + INVALID + UNKNOWN + FAILING
    assert sent.delta("router_requests") == {
        ("qwen2", "Generate", "OK"): GOOD_QWEN2,
        ("llama3", "Generate", "OK"): GOOD_LLAMA3,
        ("qwen2", "GenerateStream", "OK"): STREAMS,
        ("llama3", "GenerateStream", "OK"): STREAMS,
        ("qwen2", "Generate", "INVALID_ARGUMENT"): INVALID,
        ("unknown", "Generate", "NOT_FOUND"): UNKNOWN,
        ("qwen2", "Generate", "INTERNAL"): FAILING,
    }
    # Invalid and unknown-model requests stop at the router.
    assert sent.delta("adapter_requests") == {
        ("adapter-qwen2", "Generate", "OK"): GOOD_QWEN2,
        ("adapter-qwen2", "GenerateStream", "OK"): STREAMS,
        ("adapter-qwen2", "Generate", "INTERNAL"): FAILING,
        ("adapter-llama3", "Generate", "OK"): GOOD_LLAMA3,
        ("adapter-llama3", "GenerateStream", "OK"): STREAMS,
    }
    assert sent.delta("durations") == {
        ("router", "qwen2", "Generate"): GOOD_QWEN2 + INVALID + FAILING,
        ("router", "qwen2", "GenerateStream"): STREAMS,
        ("router", "llama3", "Generate"): GOOD_LLAMA3,
        ("router", "llama3", "GenerateStream"): STREAMS,
        ("router", "unknown", "Generate"): UNKNOWN,
        ("adapter-qwen2", "qwen2", "Generate"): GOOD_QWEN2 + FAILING,
        ("adapter-qwen2", "qwen2", "GenerateStream"): STREAMS,
        ("adapter-llama3", "llama3", "Generate"): GOOD_LLAMA3,
        ("adapter-llama3", "llama3", "GenerateStream"): STREAMS,
    }
    per_stream = {
        (service, model): STREAMS
        for model in MODELS for service in ("router", f"adapter-{model}")
    }
    assert sent.delta("ttft") == per_stream
    assert sent.delta("tpot") == per_stream


def test_errors_are_counted_by_kind(sent: Sent) -> None:
    assert sent.delta("errors") == {
        ("router", "qwen2", "invalid_argument"): INVALID,
        ("router", "unknown", "model_not_found"): UNKNOWN,
        ("router", "qwen2", "model_error"): FAILING,
        ("adapter-qwen2", "qwen2", "model_error"): FAILING,
    }
    assert sent.delta("backend_failures") == {("qwen2", "generation"): FAILING}


def test_tokens_equal_the_responses_counts(sent: Sent) -> None:
    assert all(sent.output_tokens.values()) and all(sent.input_tokens.values())
    for name, counted in (("output_tokens", sent.output_tokens),
                          ("input_tokens", sent.input_tokens)):
        assert sent.delta(name) == {
            (service, model): counted[model]
            for model in MODELS for service in ("router", f"adapter-{model}")
        }, name
    assert sent.delta("backend_tokens") == {(m,): sent.output_tokens[m] for m in MODELS}


def test_backends_and_edge_count_what_reached_them(sent: Sent) -> None:
    assert sent.delta("backend_requests") == {
        ("qwen2",): GOOD_QWEN2 + STREAMS + FAILING,
        ("llama3",): GOOD_LLAMA3 + STREAMS,
    }
    assert sent.delta("edge") == {
        ("2",): sent.statuses.count(200),
        ("4",): INVALID + UNKNOWN,
        ("5",): FAILING,
    }
    assert sent.statuses.count(200) == GOOD_QWEN2 + GOOD_LLAMA3 + STREAMS * len(MODELS)


# -- every panel of every dashboard has data ---------------------------------------


@dataclass(frozen=True)
class Query:
    dashboard: str
    panel: str
    ref: str
    expr: str

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel} [{self.ref}]: {self.expr}"


def dashboard_queries() -> list[Query]:
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text(encoding="utf-8"))
        for panel in _panels(board["panels"]):
            for target in panel.get("targets", []):
                out.append(Query(path.name, panel["title"], target["refId"], target["expr"]))
    return out


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row keeps its own


def variable_values(stack: Stack) -> dict[str, list[str]]:
    """Each query variable of the dashboards, as Grafana would fill it from Prometheus."""
    values: dict[str, list[str]] = {}
    for path in DASHBOARDS:
        board = json.loads(path.read_text(encoding="utf-8"))
        for var in board["templating"]["list"]:
            if var["type"] != "query":
                continue
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
            assert match, f"{path.name}: unsupported variable query {var['definition']}"
            url = f"{stack.prometheus}/api/v1/label/{match[2]}/values?" + urllib.parse.urlencode(
                {"match[]": match[1]}
            )
            values[var["name"]] = sorted(_get_json(url)["data"])
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        assert name in values, f"undefined variable ${name} in {expr}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def _has_data(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result)


def test_template_variables_list_the_models(stack: Stack, sent: Sent) -> None:
    values = variable_values(stack)
    assert set(MODELS) <= set(values["model"]), values
    assert "unknown" in values["model"]  # requests for unknown models are on the boards too


def test_every_dashboard_query_returns_data(stack: Stack, sent: Sent) -> None:
    queries = dashboard_queries()
    assert len(queries) > 30, "the dashboards lost their panels?"
    selections = {
        "all models": "|".join(variable_values(stack)["model"]),
        **{m: m for m in MODELS},
    }
    runs = []
    for query in queries:
        if "$model" not in query.expr:
            runs.append((query, "", substitute(query.expr, GRAFANA_VARS)))
            continue
        for label, regex in selections.items():
            runs.append((query, label, substitute(query.expr, {**GRAFANA_VARS, "model": regex})))
    # Envoy flushes its histograms every 5 s and Prometheus scrapes every 5 s:
    # give late series a few rounds before calling a panel empty.
    deadline = time.monotonic() + 30
    while True:
        empty = [
            f"{query} (model: {label or '-'})"
            for query, label, expr in runs
            if not _has_data(stack.query(expr))
        ]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not empty, "panels without data:\n" + "\n".join(empty)


# -- the rules, on real series -----------------------------------------------------


def test_rules_load_and_evaluate_cleanly(stack: Stack, sent: Sent) -> None:
    groups = _get_json(f"{stack.prometheus}/api/v1/rules")["data"]["groups"]
    assert {g["name"] for g in groups} == {"llmmesh.recording", "llmmesh.alerts"}
    rules = [rule for g in groups for rule in g["rules"]]
    assert len(rules) >= 12
    assert [r["name"] for r in rules if r["health"] != "ok"] == []


def wait_alerts(stack: Stack, name: str, timeout: float = 20.0) -> list[tuple[str, str]]:
    """(model, state) of the alert's instances, once there are any (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        alerts = _get_json(f"{stack.prometheus}/api/v1/alerts")["data"]["alerts"]
        found = sorted(
            (a["labels"].get("model", ""), a["state"])
            for a in alerts if a["labels"]["alertname"] == name
        )
        if found or time.monotonic() > deadline:
            return found
        time.sleep(1)


def test_error_ratio_alert_sees_the_failing_model(stack: Stack, sent: Sent) -> None:
    # 2 model errors in 17 qwen2 generations (invalid ones count as requests,
    # not as server errors): well over 5%, and over a request a minute.
    ratio = stack.value('model:llmmesh_server_errors:ratio_rate5m{model="qwen2"}')
    assert 0.05 < ratio < 1
    assert stack.value('model:llmmesh_server_errors:ratio_rate5m{model="llama3"}') == 0
    # The alert group evaluates on its own schedule, after the recording group.
    assert wait_alerts(stack, "LLMMeshErrorRatioHigh") == [("qwen2", "pending")]


def test_model_down_alert_follows_backend_health(stack: Stack, sent: Sent) -> None:
    down = "max by (model) (llmmesh_backend_up{service=\"router\"}) == 0"
    stack.control("llama3", mode="unhealthy")
    try:
        # adapter health poll (2 s), router's (1 s), a scrape and an evaluation (5 s each)
        assert wait_alerts(stack, "LLMMeshModelDown", timeout=40) == [("llama3", "pending")]
        assert [s["metric"]["model"] for s in stack.query(down)] == ["llama3"]
    finally:
        stack.control("llama3")
    deadline = time.monotonic() + 40
    while stack.query(down) and time.monotonic() < deadline:
        time.sleep(1)
    assert stack.query(down) == []


def test_launcher_prints_the_prometheus_url(stack: Stack) -> None:
    line = f"Prometheus          {stack.prometheus}"
    deadline = time.monotonic() + 10  # printed once Prometheus is ready, as the fixture saw
    while line not in stack.launcher_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert line in stack.launcher_log.read_text()


# -- known gap ---------------------------------------------------------------------


def _router_timeouts(stack: Stack) -> float:
    with urllib.request.urlopen(stack.router_metrics, timeout=5) as resp:
        text = resp.read().decode()
    pattern = r'llmmesh_errors_total\{model="llama3",reason="timeout",service="router"\} (\S+)'
    match = re.search(pattern, text)
    return float(match[1]) if match else 0.0


def test_an_expired_deadline_counts_as_a_timeout(stack: Stack, sent: Sent) -> None:
    before = _router_timeouts(stack)
    stack.control("llama3", mode="hang")
    try:
        request = urllib.request.Request(
            f"{stack.http}/v1/generate", method="POST",
            data=json.dumps({"model_id": "llama3", "inputs": "hello"}).encode(),
            # An HTTP client's deadline: Envoy honours grpc-timeout and passes it on.
            headers={"Content-Type": "application/json", "grpc-timeout": "1S"},
        )
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=10)
        assert error.value.code == 504
    finally:
        stack.control("llama3")
    time.sleep(0.5)
    assert _router_timeouts(stack) == before + 1
