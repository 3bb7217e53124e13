"""The whole mesh as real processes: two TGI doubles, started here, and the
launcher (`make up`'s entry point) starting adapters, router and Envoy in
front of them on free ports. The fixtures over it are in fixtures.py."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.procs import free_port, python_module, start, stop, wait_http
from tests.harness.wait import eventually

MODELS = ("qwen2", "llama3")


@dataclass
class Double:
    url: str
    proc: subprocess.Popen[bytes]

    def control(self, **state: Any) -> None:
        _post(f"{self.url}/_control", state)

    def reset(self) -> None:
        _post(f"{self.url}/_reset", {})

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/_stats", timeout=5) as resp:
            return dict(json.loads(resp.read()))


@dataclass
class Mesh:
    envoy: str  # host:port
    router: str
    adapters: dict[str, str]
    metrics: int
    doubles: dict[str, Double]
    run_dir: Path
    launcher: subprocess.Popen[bytes]
    api_key: str | None = None  # when started with an API key file holding it

    @property
    def http(self) -> str:
        return f"http://{self.envoy}"

    def log(self, name: str) -> str:
        return (self.run_dir / "logs" / f"{name}.log").read_text(errors="replace")


def _post(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        resp.read()


def start_doubles(tmp: Path, **flags: str) -> dict[str, Double]:
    doubles = {}
    for model in MODELS:
        port = free_port()
        args = ["--port", str(port), "--model-id", f"double/{model}"]
        for key, value in flags.items():
            args += [f"--{key.replace('_', '-')}", value]
        proc = start(python_module("tools.tgi_double", *args),
                     log_path=tmp / f"double-{model}.log")
        doubles[model] = Double(f"http://127.0.0.1:{port}", proc)
    for double in doubles.values():
        wait_http(f"{double.url}/health", 30, double.proc)
    return doubles


PORT_TAKEN = ("Address already in use", "ports already in use")


def start_mesh(tmp: Path, doubles: dict[str, Double], *extra: str) -> Mesh:
    """The launched mesh on free ports. A port picked as free can be taken by
    another process before the launcher binds it; then it starts again on
    other ports (twice at most), since that race is the harness's, not the
    launcher's (whose own refusal of a port in use test_launcher checks)."""
    for attempt in range(3):
        try:
            return _start_mesh(tmp, doubles, *extra)
        except RuntimeError:
            log = (tmp / "launcher.log").read_text(errors="replace")
            if attempt == 2 or not any(taken in log for taken in PORT_TAKEN):
                raise
    raise AssertionError("unreachable")


def _start_mesh(tmp: Path, doubles: dict[str, Double], *extra: str) -> Mesh:
    ports = {name: free_port() for name in ("envoy", "admin", "router", "openai", "metrics")}
    adapter_base = free_run(len(MODELS))
    metrics_base = free_run(1 + len(MODELS))
    backends = " ".join(f"{m}={d.url}" for m, d in doubles.items())
    run_dir = tmp / "run"
    launcher = start(
        python_module(
            "services.launcher", "--backends", backends, "--run-dir", str(run_dir),
            "--envoy-port", str(ports["envoy"]), "--admin-port", str(ports["admin"]),
            "--router-port", str(ports["router"]), "--openai-port", str(ports["openai"]),
            "--adapter-port", str(adapter_base),
            "--metrics-port", str(metrics_base), "--no-prometheus", *extra,
        ),
        log_path=tmp / "launcher.log",
    )
    mesh = Mesh(
        envoy=f"127.0.0.1:{ports['envoy']}",
        router=f"127.0.0.1:{ports['router']}",
        adapters={m: f"127.0.0.1:{adapter_base + i}" for i, m in enumerate(MODELS)},
        metrics=metrics_base,
        doubles=doubles,
        run_dir=run_dir,
        launcher=launcher,
    )
    try:
        wait_launcher(tmp / "launcher.log", launcher, 120)
    except Exception:
        stop_mesh(mesh)
        print((tmp / "launcher.log").read_text(errors="replace"))
        raise
    return mesh


def launch(
    log: Path, args: Callable[[], Sequence[str]], timeout: float,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """The launcher with the arguments `args()` makes, once it is up. As in
    start_mesh, a port picked as free and taken before the launcher bound it
    starts it again with new arguments (so `args` picks its ports anew), twice
    at most."""
    for attempt in range(3):
        launcher = start(python_module("services.launcher", *args()), env=env, log_path=log)
        try:
            wait_launcher(log, launcher, timeout)
            return launcher
        except RuntimeError:
            stop_launcher(launcher)
            if attempt == 2 or not any(t in log.read_text(errors="replace") for t in PORT_TAKEN):
                raise
    raise AssertionError("unreachable")


def wait_launcher(log: Path, launcher: subprocess.Popen[bytes], timeout: float) -> None:
    """Until the launcher says every process is ready (its own checks are thorough)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "llmmesh is up." in log.read_text(errors="replace"):
            return
        if launcher.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            raise RuntimeError(f"the launcher exited with {launcher.returncode}:\n{tail}")
        time.sleep(0.2)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    raise TimeoutError(f"the mesh was not up after {timeout}s:\n{tail}")


def models(mesh: Mesh) -> list[dict[str, Any]]:
    """GET /v1/mesh/models through Envoy (with the mesh's API key, if any)."""
    headers = {"Authorization": f"Bearer {mesh.api_key}"} if mesh.api_key else {}
    request = urllib.request.Request(f"{mesh.http}/v1/mesh/models", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as resp:
        return list(json.loads(resp.read())["models"])


def reset(mesh: Mesh, timeout: float = 30.0) -> None:
    """Both doubles back to their state at start, and every model ready again."""
    for double in mesh.doubles.values():
        double.reset()
    eventually(lambda: all(m["ready"] for m in models(mesh)), timeout, "every model ready")


def free_run(n: int) -> int:
    """The first of n consecutive free ports."""
    import socket

    for _ in range(50):
        base = free_port()
        sockets = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                sockets.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no run of free ports")


def stop_mesh(mesh: Mesh) -> None:
    stop_launcher(mesh.launcher)


def stop_launcher(launcher: subprocess.Popen[bytes]) -> None:
    """SIGINT, as Ctrl-C: the launcher stops its processes in order."""
    if launcher.poll() is None:
        launcher.send_signal(signal.SIGINT)
        try:
            launcher.wait(40)
        except subprocess.TimeoutExpired:
            stop(launcher)


@contextlib.contextmanager
def running_mesh(
    tmp: Path, *launcher_args: str, api_key: str | None = None, **double_flags: str
) -> Iterator[Mesh]:
    """Doubles and the launched mesh for the block; everything stopped after.
    With `api_key`, the mesh accepts that key and no request without it."""
    if api_key is not None:
        keys = tmp / "api-keys"
        keys.write_text(f"# one key per line\n{api_key}\n")
        launcher_args = (*launcher_args, "--api-keys-file", str(keys))
    doubles = start_doubles(tmp, **double_flags)
    try:
        mesh = start_mesh(tmp, doubles, *launcher_args)
        mesh.api_key = api_key
        try:
            yield mesh
        finally:
            stop_mesh(mesh)
    finally:
        for double in doubles.values():
            stop(double.proc)
