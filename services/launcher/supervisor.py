"""Start the plan's processes stage by stage, wait until each is ready, watch
them, and stop them all, in reverse order, on a signal or when one dies."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.launcher import configs
from services.launcher.plan import LaunchError, Plan, Proc, Ready

__all__ = ["LaunchError", "Supervisor"]

GRACE_SECONDS = 10.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Children live in their own session (so the launcher orders the shutdown),
    # and the kernel still stops them if the launcher itself is killed.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    def __init__(self, plan: Plan, log: Callable[[str], None] = print) -> None:
        self.plan = plan
        self._log = log
        self._running: list[tuple[Proc, subprocess.Popen[bytes]]] = []
        self._stop = False

    def request_stop(self) -> None:
        self._stop = True

    # -- the whole life ----------------------------------------------------------

    def run(self, ready_timeout: float = 180.0) -> int:
        self._check_ports()
        self.plan.log_dir.mkdir(parents=True, exist_ok=True)
        configs.write(self.plan)
        try:
            for stage in sorted({p.stage for p in self.plan.procs}):
                procs = [p for p in self.plan.procs if p.stage == stage]
                for proc in procs:
                    self._start(proc)
                self._wait_ready(procs, ready_timeout)
                if self._stop:
                    return 130
            self._log(configs.banner(self.plan))
            return self._watch()
        finally:
            self.shutdown()

    def _watch(self) -> int:
        while not self._stop:
            for proc, popen in self._running:
                if popen.poll() is not None:
                    self._log(self._died(proc, popen))
                    return 1
            time.sleep(0.5)
        return 0

    def shutdown(self) -> None:
        """SIGTERM each process, newest first; SIGKILL what outlives the grace period."""
        if self._running:
            self._log("stopping the mesh ...")
        for proc, popen in reversed(self._running):
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
                try:
                    popen.wait(GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    self._log(f"{proc.name} did not stop in {GRACE_SECONDS:.0f}s; killing it")
                    popen.kill()
                    popen.wait()
        if self._running:
            self._log("stopped")
        self._running.clear()

    # -- helpers ------------------------------------------------------------------

    def _check_ports(self) -> None:
        busy = []
        for proc in self.plan.procs:
            for port in proc.ports:
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        s.bind((self.plan.host, port))
                    except OSError:
                        busy.append(f"{port} ({proc.name})")
        if busy:
            raise LaunchError(
                f"ports already in use: {', '.join(busy)}. Is another mesh running? "
                "Stop it, or choose other ports (python -m services.launcher --help)."
            )

    def log_path(self, proc: Proc) -> Path:
        return self.plan.log_dir / f"{proc.name}.log"

    def _start(self, proc: Proc) -> None:
        out = self.log_path(proc).open("ab")
        env = {**os.environ, **proc.env, "PYTHONUNBUFFERED": "1"}
        popen = subprocess.Popen(
            proc.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=configs.ROOT, start_new_session=True, preexec_fn=_die_with_parent,
        )
        out.close()
        self._running.append((proc, popen))
        self._log(f"started {proc.name} (pid {popen.pid}), log: {self.log_path(proc)}")

    def _wait_ready(self, procs: list[Proc], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = list(procs)
        while waiting and not self._stop:
            for proc in list(waiting):
                popen = next(p for q, p in self._running if q is proc)
                if popen.poll() is not None:
                    raise LaunchError(self._died(proc, popen))
                if is_ready(proc.ready):
                    self._log(f"{proc.name} is ready")
                    waiting.remove(proc)
            if waiting and time.monotonic() > deadline:
                names = ", ".join(p.name for p in waiting)
                tails = "\n".join(self._tail(p) for p in waiting)
                raise LaunchError(f"not ready after {timeout:.0f}s: {names}\n{tails}")
            time.sleep(0.2)

    def _died(self, proc: Proc, popen: subprocess.Popen[bytes]) -> str:
        return f"{proc.name} exited with code {popen.returncode}\n{self._tail(proc)}"

    def _tail(self, proc: Proc, lines: int = 20) -> str:
        try:
            text = self.log_path(proc).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return f"  (no log at {self.log_path(proc)})"
        body = "\n".join(f"  | {line}" for line in text.splitlines()[-lines:])
        return f"--- last lines of {self.log_path(proc)}:\n{body}"


def is_ready(ready: Ready) -> bool:
    if ready.kind == "http":
        headers = {"Authorization": ready.authorization} if ready.authorization else {}
        try:
            request = urllib.request.Request(ready.target, headers=headers)
            with urllib.request.urlopen(request, timeout=1) as resp:
                if resp.status != 200:
                    return False
                if ready.target.endswith("/v1/mesh/models"):
                    models = json.loads(resp.read()).get("models", [])
                    return bool(models) and all(m.get("ready") for m in models)
                return True
        except (urllib.error.URLError, OSError, ValueError):
            return False
    with grpc.insecure_channel(ready.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return all(
                stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=1).status
                == health_pb2.HealthCheckResponse.SERVING
                for name in ready.services
            )
        except grpc.RpcError:
            return False
