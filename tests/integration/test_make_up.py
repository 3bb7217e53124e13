"""`make up`'s entry point with the real CPU backends (llama.cpp + SmolLM2):
started in the background, asked the guide's questions through Envoy,
stopped with SIGINT to its process group, and nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.harness.mesh import free_run, launch, stop_launcher
from tests.harness.procs import ROOT, free_port, python_module, start, stop, wait_http

pytestmark = pytest.mark.integration

GUIDE_BODIES = [
    {"model_id": "qwen2", "inputs": "你好",
     "parameters": {"max_new_tokens": 64, "temperature": 0.7, "top_p": 0.9}},
    {"model_id": "llama3", "inputs": "Hello, how are you?", "parameters": {"max_new_tokens": 64}},
    {"model_id": "llama3", "inputs": "What is photosynthesis?", "scenario": "qa",
     "parameters": {"max_new_tokens": 48}},
]


def children(pid: int) -> set[int]:
    """Every descendant of pid, from /proc."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = {int(p) for p in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += sorted(kids - out)
            out |= kids
    return out


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_make_up_serves_real_text_and_stops_cleanly(tmp_path: Path) -> None:
    llama = pytest.importorskip("llama_cpp", reason="make test installs llama-cpp-python")
    del llama
    envoy_port = free_port()
    adapters, backends, metrics = free_run(2), free_run(2), free_run(3)
    log = tmp_path / "up.log"
    # In a session of its own, as `make up` in a terminal is a process group.
    launcher = subprocess.Popen(
        python_module(
            "services.launcher", "--run-dir", str(tmp_path / "run"),
            "--envoy-port", str(envoy_port), "--admin-port", str(free_port()),
            "--router-port", str(free_port()), "--adapter-port", str(adapters),
            "--backend-port", str(backends), "--metrics-port", str(metrics),
            "--openai-port", str(free_port()), "--no-prometheus",
        ),
        cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    spawned: set[int] = set()
    try:
        # Scripts wait for readiness by polling /v1/mesh/models, as the README says.
        base = f"http://127.0.0.1:{envoy_port}"
        deadline = time.monotonic() + 180
        while True:
            assert launcher.poll() is None, log.read_text()
            spawned |= children(launcher.pid)
            try:
                with urllib.request.urlopen(f"{base}/v1/mesh/models", timeout=2) as resp:
                    models = json.loads(resp.read())["models"]
                if all(m["ready"] for m in models):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        assert {m["backend_model"] for m in models} == {"SmolLM2-135M-Instruct"}
        # The banner follows the launcher's own last check, a moment later.
        for _ in range(100):
            if "llmmesh is up." in log.read_text():
                break
            time.sleep(0.1)
        banner = log.read_text()
        assert "llmmesh is up." in banner and "curl" in banner
        for body in GUIDE_BODIES:
            request = urllib.request.Request(
                f"{base}/v1/generate", data=json.dumps(body).encode(), method="POST",
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as resp:
                reply = json.loads(resp.read())
            assert reply["generated_text"].strip(), reply
            if "temperature" not in body["parameters"]:
                # Greedy decoding of an English prompt: SmolLM2 answers in words.
                # (Sampled at 0.7 from "你好" it may answer in emoji.)
                assert len(reply["generated_text"].split()) >= 3, reply
            assert 0 < reply["tokens"] <= body["parameters"]["max_new_tokens"]
            assert reply["input_tokens"] > 0
        spawned |= children(launcher.pid)
        assert len(spawned) >= 6  # two backends, two adapters, router, Envoy
    finally:
        # SIGINT to the process group, like Ctrl-C in a terminal.
        os.killpg(launcher.pid, signal.SIGINT)
        try:
            code = launcher.wait(60)
        except subprocess.TimeoutExpired:
            launcher.kill()
            raise
    assert code == 0, log.read_text()
    assert "stopped" in log.read_text()
    left = [pid for pid in spawned if alive(pid)]
    assert left == [], f"processes left behind: {left}"


def _launcher_children(pid: int) -> dict[int, bytes]:
    out = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            out[int(child)] = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
    return out


def _model(base: str, model: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{base}/v1/mesh/models/{model}", timeout=5) as resp:
        body = json.loads(resp.read())
    info = body.get("model", body)
    return {k.replace("readyReplicas", "ready_replicas"): v for k, v in info.items()}


def _until(check: object, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}\n{log.read_text()}"
        time.sleep(0.2)


def test_replicas_two_runs_two_backends_and_adapters_per_model_and_says_a_model_down(
    tmp_path: Path,
) -> None:
    pytest.importorskip("llama_cpp", reason="make test installs llama-cpp-python")
    # llama3: REPLICAS=2 CPU backends; qwen2: two engines given as BACKENDS (TGI doubles).
    doubles = []
    urls = []
    for i in range(2):
        port = free_port()
        doubles.append(start(python_module("tools.tgi_double", "--port", str(port),
                                           "--model-id", "double/qwen2"),
                             log_path=tmp_path / f"double-{i}.log"))
        urls.append(f"http://127.0.0.1:{port}")
    ports: dict[str, int] = {}

    def args() -> list[str]:
        ports.update(envoy=free_port(), backends=free_run(4))
        return [
            "--run-dir", str(tmp_path / "run"), "--no-prometheus",
            "--replicas", "2", "--backends", f"qwen2={','.join(urls)}", "--threads", "1",
            "--envoy-port", str(ports["envoy"]), "--admin-port", str(free_port()),
            "--router-port", str(free_port()), "--adapter-port", str(free_run(4)),
            "--backend-port", str(ports["backends"]), "--metrics-port", str(free_run(5)),
            "--openai-port", str(free_port()),
        ]

    log = tmp_path / "up.log"
    launcher = None
    try:
        for double, url in zip(doubles, urls, strict=True):
            wait_http(f"{url}/health", 30, double)
        launcher = launch(log, args, 240)
        base, backends = f"http://127.0.0.1:{ports['envoy']}", ports["backends"]
        for model in ("qwen2", "llama3"):
            info = _model(base, model)
            assert (info["replicas"], info["ready_replicas"]) == (2, 2), info
        banner = log.read_text()
        # llama3 is the registry's second model: its backends follow qwen2's two slots.
        for port in (backends + 2, backends + 3):
            assert f"-> http://127.0.0.1:{port} (CPU backend" in banner, banner
        for url in urls:
            assert "qwen2    adapter 127.0.0.1:" in banner and f"-> {url}" in banner

        def backend_pids() -> list[int]:
            return [p for p, c in _launcher_children(launcher.pid).items()
                    if b"services.cpu_backend" in c]

        # One replica down: the model still serves, so no outage is said.
        first = backend_pids()
        assert len(first) == 2
        os.kill(first[0], signal.SIGKILL)
        _until(lambda: "restarted backend-llama3" in log.read_text(), 30, "restart", log)
        _until(lambda: _model(base, "llama3")["ready_replicas"] == 2, 90, "both back", log)
        assert "MODEL DOWN" not in log.read_text()
        # The router restarting is not an outage of the models behind it.
        router = [p for p, c in _launcher_children(launcher.pid).items()
                  if b"services.router" in c]
        os.kill(router[0], signal.SIGKILL)
        _until(lambda: "router serves again" in log.read_text(), 60, "router back", log)
        time.sleep(1.5)  # a few of the watch's polls
        assert "MODEL DOWN" not in log.read_text()
        # Every replica down: said with the model and the time, then said back.
        # Stopped rather than killed, so the outage lasts until the test ends it
        # (a killed backend is back within two seconds, which a loaded machine's
        # health rounds may not see).
        stopped = backend_pids()
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            _until(lambda: "MODEL DOWN: llama3 has no serving replica since" in log.read_text(),
                   60, "model down", log)
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        _until(lambda: "model llama3 serves again at" in log.read_text(), 120, "back", log)
        assert "MODEL DOWN: qwen2" not in log.read_text()
        assert "stopping the mesh" not in log.read_text()
    finally:
        if launcher is not None:
            stop_launcher(launcher)
        for double in doubles:
            stop(double)
