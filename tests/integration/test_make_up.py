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

from tests.harness.mesh import free_run
from tests.harness.procs import ROOT, free_port, python_module

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
