"""`make up`'s launcher when things go wrong: a port in use, a process that
dies while starting, and processes killed while the mesh serves (each kind:
CPU backend, adapter, router, Envoy), which come back by themselves while
the rest keeps serving; and one that keeps dying, which is given up.

The kill tests run one mesh: qwen2 over a TGI double (the model is not the
point there), llama3 over the real CPU backend (llama.cpp + SmolLM2), so
that a killed backend is the launcher's own process."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from llmmesh.v1 import generate_pb2 as pb
from llmmesh.v1 import generate_pb2_grpc as pb_grpc

from tests.harness.mesh import free_run, running_mesh, stop_launcher, wait_launcher
from tests.harness.procs import ROOT, free_port, python_module, start, stop, wait_http
from tests.harness.wait import eventually

pytestmark = pytest.mark.integration


def launch(tmp: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.launcher", "--run-dir", str(tmp / "run"),
         "--no-prometheus", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )


def test_a_port_in_use_is_named(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = launch(tmp_path, "--envoy-port", str(port),
                        "--backends", "qwen2=http://127.0.0.1:1 llama3=http://127.0.0.1:1")
    assert result.returncode == 1
    assert f"ports already in use: {port} (envoy)" in result.stderr
    logs = tmp_path / "run" / "logs"
    assert not logs.exists() or not any(logs.iterdir())  # nothing was started


def test_bad_backends_value_is_refused(tmp_path: Path) -> None:
    result = launch(tmp_path, "--backends", "qwen2=localhost:8080")
    assert result.returncode == 2 and "MODEL=http://HOST:PORT" in result.stderr
    result = launch(tmp_path, "--backends", "gpt4=http://127.0.0.1:1")
    assert result.returncode == 2 and "registry has qwen2, llama3" in result.stderr


def test_a_process_dying_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a model")
    ports = [free_port() for _ in range(3)]
    # Adapters, backends and metrics take runs of consecutive ports.
    result = launch(tmp_path, "--model-path", str(broken), "--envoy-port", str(ports[0]),
                    "--admin-port", str(ports[1]), "--router-port", str(ports[2]),
                    "--adapter-port", str(free_run(2)), "--backend-port", str(free_run(2)),
                    "--metrics-port", str(free_run(3)), "--openai-port", str(free_port()))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "exited with code" in result.stderr and "last lines of" in result.stderr
    assert "restarting" not in result.stdout  # a death while starting is not retried
    assert "stopped" in result.stdout  # what had started was stopped again


# -- killed while serving -------------------------------------------------------------


def children(pid: int) -> dict[int, bytes]:
    """The launcher's children: pid -> command line."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    out = {}
    for child in path.read_text().split():
        try:
            out[int(child)] = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
    return out


MATCH: dict[str, Callable[[bytes], bool]] = {
    "backend-llama3": lambda c: b"services.cpu_backend" in c,
    "adapter-qwen2": lambda c: b"services.adapter" in c and b"--model\0qwen2\0" in c,
    "adapter-llama3": lambda c: b"services.adapter" in c and b"--model\0llama3\0" in c,
    "router": lambda c: b"services.router" in c,
    "envoy": lambda c: c.split(b"\0")[0].endswith(b"/envoy"),
}


@dataclass
class Mixed:
    launcher: subprocess.Popen[bytes]
    log: Path
    envoy: str
    router: str
    adapters: dict[str, str]
    seen: set[int] = field(default_factory=set)  # every child pid ever seen

    def pid(self, name: str) -> int:
        found = [p for p, cmd in children(self.launcher.pid).items() if MATCH[name](cmd)]
        assert len(found) == 1, (name, found)
        self.seen.update(children(self.launcher.pid))
        return found[0]


def http_outcome(envoy: str, model: str) -> str:
    """`ok`, `<HTTP status> <ErrorInfo reason>`, or what the connection did."""
    body = {"model_id": model, "inputs": "ping", "parameters": {"max_new_tokens": 1}}
    request = urllib.request.Request(
        f"http://{envoy}/v1/generate", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            ok = resp.status == 200 and json.loads(resp.read())["tokens"] >= 1
            return "ok" if ok else f"{resp.status} no tokens"
    except urllib.error.HTTPError as exc:
        details = json.loads(exc.read()).get("details") or [{}]
        return f"{exc.code} {details[0].get('reason', '-')}"
    except urllib.error.URLError as exc:
        return "refused" if isinstance(exc.reason, ConnectionRefusedError) else f"error {exc}"
    except http.client.RemoteDisconnected:
        return "closed"
    except (OSError, ValueError) as exc:
        return f"error {exc}"


def http_generate(envoy: str, model: str) -> bool:
    return http_outcome(envoy, model) == "ok"


def grpc_generate(address: str, model: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = pb_grpc.GenerateServiceStub(channel).Generate(
                pb.GenerateRequest(model_id=model, inputs="ping",
                                   parameters=pb.GenerationParameters(max_new_tokens=1)),
                timeout=10)
        except grpc.RpcError:
            return False
    return reply.tokens >= 1


class Prober:
    """Calls `check` again and again in a thread; keeps every outcome."""

    def __init__(self, check: Callable[[], bool]) -> None:
        self.check = check
        self.results: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.results.append((time.monotonic(), self.check()))
            self._stop.wait(0.1)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mixed]:
    pytest.importorskip("llama_cpp", reason="make test installs llama-cpp-python")
    tmp = tmp_path_factory.mktemp("mixed")
    double_port = free_port()
    double = start(python_module("tools.tgi_double", "--port", str(double_port),
                                 "--model-id", "double/qwen2"),
                   log_path=tmp / "double.log")
    ports = {n: free_port() for n in ("envoy", "admin", "router")}
    adapters, backends, metrics = free_run(2), free_run(2), free_run(3)
    log = tmp / "launcher.log"
    try:
        wait_http(f"http://127.0.0.1:{double_port}/health", 30, double)
        launcher = start(python_module(
            "services.launcher", "--run-dir", str(tmp / "run"), "--no-prometheus",
            "--backends", f"qwen2=http://127.0.0.1:{double_port}", "--threads", "1",
            "--envoy-port", str(ports["envoy"]), "--admin-port", str(ports["admin"]),
            "--router-port", str(ports["router"]), "--adapter-port", str(adapters),
            "--backend-port", str(backends), "--metrics-port", str(metrics),
            "--openai-port", str(free_port()),
        ), log_path=log)
        mesh = Mixed(launcher, log, f"127.0.0.1:{ports['envoy']}",
                     f"127.0.0.1:{ports['router']}",
                     {"qwen2": f"127.0.0.1:{adapters}", "llama3": f"127.0.0.1:{adapters + 1}"})
        try:
            wait_launcher(log, launcher, 180)
            yield mesh
        finally:
            stop_launcher(launcher)
    finally:
        stop(double)


# Killed process -> (who must serve throughout, what must serve again after).
KILLS: dict[str, tuple[list[str], list[str]]] = {
    "backend-llama3": (["envoy/qwen2"], ["envoy/llama3"]),
    "adapter-llama3": (["envoy/qwen2"], ["envoy/llama3"]),
    "adapter-qwen2": (["envoy/llama3"], ["envoy/qwen2"]),
    "router": (["adapter/qwen2", "adapter/llama3"], ["envoy/qwen2", "envoy/llama3"]),
    "envoy": (["router/qwen2", "router/llama3"], ["envoy/qwen2", "envoy/llama3"]),
}
# What the model that went away answers through Envoy meanwhile: clear errors.
UNAVAILABLE = r"503 (BACKEND|MODEL)_UNAVAILABLE"
OUTAGE = {
    # The request that was generating when the backend died: INCOMPLETE_GENERATION.
    "backend-llama3": r"503 (BACKEND_UNAVAILABLE|MODEL_UNAVAILABLE|INCOMPLETE_GENERATION)",
    "adapter-llama3": UNAVAILABLE,
    "adapter-qwen2": UNAVAILABLE,
    "router": r"503 .*",  # Envoy's own reply while no router listens, or the router's
    "envoy": "refused|closed",  # closed: the request in flight when it died
}


def checker(mesh: Mixed, spec: str) -> Callable[[], bool]:
    via, model = spec.split("/")
    if via == "envoy":
        return lambda: http_generate(mesh.envoy, model)
    address = mesh.router if via == "router" else mesh.adapters[model]
    return lambda: grpc_generate(address, model)


@pytest.mark.parametrize("name", list(KILLS))
def test_a_killed_process_comes_back_while_the_rest_serves(mixed: Mixed, name: str) -> None:
    keep, back = KILLS[name]
    for spec in KILLS["envoy"][1]:  # the whole mesh serves before the kill
        eventually(checker(mixed, spec), 90, f"{spec} before killing {name}")
    old = mixed.pid(name)
    probers = [Prober(checker(mixed, spec)) for spec in keep]
    outcomes: list[str] = []
    model = back[0].split("/")[1]
    probers.append(Prober(lambda: outcomes.append(http_outcome(mixed.envoy, model)) is None))
    for prober in probers:
        prober.__enter__()
    try:
        time.sleep(0.5)
        killed_at = time.monotonic()
        os.kill(old, signal.SIGKILL)
        recovered = {spec: eventually(checker(mixed, spec), 90, f"{spec} after {name}")
                     for spec in back}
        time.sleep(0.5)
    finally:
        for prober in probers:
            prober.__exit__()
    failures = sorted(set(outcomes) - {"ok"})
    print(f"\n{name} killed: service back after "
          + ", ".join(f"{spec} {s:.1f} s" for spec, s in recovered.items())
          + f"; {model} meanwhile: {failures}")
    assert all(re.fullmatch(OUTAGE[name], f) for f in failures), failures
    for spec, prober in zip(keep, probers[:-1], strict=True):
        during = [ok for t, ok in prober.results if t >= killed_at]
        assert len(during) >= 3 and all(during), f"{spec} while {name} was down: {during}"
    new = mixed.pid(name)
    assert new != old
    assert mixed.launcher.poll() is None
    text = mixed.log.read_text()
    assert f"{name} exited with code -9 (SIGKILL)" in text
    assert f"restarting {name} in 1 s" in text
    assert f"restarted {name} (pid {new})" in text
    eventually(lambda: f"{name} serves again" in mixed.log.read_text(), 30, "report")


def test_ctrl_c_still_stops_everything_restarted_processes_included(mixed: Mixed) -> None:
    mixed.seen.update(children(mixed.launcher.pid))
    assert len(mixed.seen) >= 5
    mixed.launcher.send_signal(signal.SIGINT)
    assert mixed.launcher.wait(60) == 0
    assert "stopped" in mixed.log.read_text()
    left = [pid for pid in mixed.seen if _alive(pid)]
    assert left == [], f"left behind: {left}"


# -- a process that keeps dying ----------------------------------------------------------


def test_a_process_that_keeps_dying_is_given_up_plainly(tmp_path: Path) -> None:
    with running_mesh(tmp_path, "--restart-limit", "2") as mesh:
        log = tmp_path / "launcher.log"
        seen = set(children(mesh.launcher.pid))
        pid = next(p for p, c in children(mesh.launcher.pid).items()
                   if MATCH["adapter-qwen2"](c))
        os.kill(pid, signal.SIGKILL)
        eventually(lambda: "restarted adapter-qwen2" in log.read_text(), 30, "restart")
        pid = next(p for p, c in children(mesh.launcher.pid).items()
                   if MATCH["adapter-qwen2"](c))
        seen |= set(children(mesh.launcher.pid))
        os.kill(pid, signal.SIGKILL)
        eventually(lambda: "GIVING UP on adapter-qwen2" in log.read_text(), 30, "give up")
        assert "it died 2 times within 60 s" in log.read_text()
        # The rest keeps serving; qwen2 answers a clear 503 instead of hanging.
        eventually(lambda: http_generate(mesh.envoy, "llama3"), 30, "llama3")
        time.sleep(2.5)  # longer than the first backoff: no restart comes
        assert mesh.launcher.poll() is None
        assert not any(MATCH["adapter-qwen2"](c) for c in children(mesh.launcher.pid).values())
        request = urllib.request.Request(
            f"{mesh.http}/v1/generate", method="POST",
            data=json.dumps({"model_id": "qwen2", "inputs": "hi"}).encode())
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == 503
        assert "MODEL_UNAVAILABLE" in caught.value.read().decode()
        assert http_generate(mesh.envoy, "llama3")
        seen |= set(children(mesh.launcher.pid))
        mesh.launcher.send_signal(signal.SIGINT)
        assert mesh.launcher.wait(60) == 1  # it ran without a part: not a clean run
    assert "stopped" in log.read_text()
    assert [p for p in seen if _alive(p)] == []


# -- the banner's commands, pasted as printed ---------------------------------------------


def banner_commands(text: str) -> list[str]:
    """The shell lines of the banner's Try: section, continuations joined."""
    banner = text[text.index("llmmesh is up."):]
    lines = banner.splitlines()
    out: list[str] = []
    keep = False
    for line in lines:
        if line.strip().startswith("KEY="):
            out.append(line.strip())
        if re.match(r"(Then try|Try):", line):
            keep = True
            continue
        if keep and not line.strip():
            break
        if keep:
            if out and out[-1].endswith("\\"):
                out[-1] = out[-1][:-1] + line.strip()
            else:
                out.append(line.strip())
    return out


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls-and-keys"])
def test_the_banners_commands_work_as_printed(tmp_path: Path, secure: bool) -> None:
    extra: list[str] = []
    if secure:
        keys = tmp_path / "keys.txt"
        keys.write_text("# the mesh's keys\n\n  k-first-key  \nk-second\n")
        extra = ["--tls", "--api-keys-file", str(keys)]
    with running_mesh(tmp_path, *extra) as mesh:
        commands = banner_commands((tmp_path / "launcher.log").read_text())
        assert len(commands) == (4 if secure else 3), commands
        # As typed in a fresh terminal: no venv on PATH.
        script = "set -e\n" + "\n".join(f"{c}\necho '<end>'" for c in commands)
        run = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
        assert run.returncode == 0, run.stdout + run.stderr
        outputs = run.stdout.split("<end>")
        unary, stream, listing = outputs[-4:-1]
        assert json.loads(unary)["model_id"] == "qwen2", unary
        assert "data: " in stream and "FINISH_REASON_EOS_TOKEN" in stream, stream
        assert "llmmesh.v1.GenerateService" in listing
        if secure:
            assert f"https://{mesh.envoy}/v1/generate" in commands[1]
            # The banner's header is what lets the call in.
            header = ' -H "Authorization: Bearer $KEY"'
            assert header in commands[1]
            without = subprocess.run(["bash", "-c", commands[1].replace(header, "")], cwd=ROOT,
                                     capture_output=True, text=True, timeout=30, check=False)
            assert json.loads(without.stdout)["code"] == 16, without  # UNAUTHENTICATED


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
