"""The mesh assembled process by process, so that tests can kill, stop and
restart any one part of it: TGI doubles, several adapter replicas of one
model, the router and Envoy.

The launcher (mesh.start_mesh) starts exactly one adapter per model and
restarts whatever dies on its own schedule, which is right for `make up` and
wrong for fault injection that decides when a part comes back; these helpers
start the same commands (`python -m services.router`, `python -m
services.adapter`, Envoy from envoy/render.py) one by one instead.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from llmmesh.v1 import generate_pb2 as pb
from llmmesh.v1 import generate_pb2_grpc as pb_grpc

from tests.harness.mesh import Double
from tests.harness.procs import ROOT, free_port, python_module, start, wait_http

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ENVOY = str(Path(sys.executable).parent / "envoy")


def health_status(address: str, service: str = "", timeout: float = 2.0) -> int | None:
    """The grpc.health.v1 status at `address`, or None when it does not answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return None
    return int(reply.status)


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc/PID/status (VmRSS, KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class Part:
    """One process of the mesh that can be started again with the same command."""

    name: str
    argv: list[str]
    log: Path
    ready: Callable[[Part], None]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    current_log: Path | None = None  # the log of the latest run

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def logs(self) -> list[Path]:
        """The log of every run of this part: name.log, name.2.log, ..."""
        return sorted(self.log.parent.glob(f"{self.log.stem}*.log"))

    def spawn(self) -> None:
        """Start the process without waiting for it to be ready."""
        runs = len(self.logs)
        log = self.log if runs == 0 else self.log.with_name(f"{self.log.stem}.{runs + 1}.log")
        self.proc = start(self.argv, env=self.env, log_path=log)
        self.current_log = log

    def start(self, timeout: float = 30.0) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ready(self)
                return
            except (AssertionError, OSError, TimeoutError):
                if not self.alive:
                    raise RuntimeError(f"{self.name} exited: {self.tail()}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready: {self.tail()}") from None
                time.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return int(self.proc.wait(timeout))

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self, lines: int = 15) -> str:
        try:
            log = self.current_log or self.log
            return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _http_ready(url: str) -> Callable[[Part], None]:
    def check(part: Part) -> None:
        wait_http(url, 0.5)

    return check


def _grpc_ready(address: str, service: str = "") -> Callable[[Part], None]:
    def check(part: Part) -> None:
        assert health_status(address, service, timeout=0.5) == SERVING

    return check


class DoublePart(Part):
    """A TGI double process, with the control and stats of mesh.Double."""

    def __init__(self, name: str, tmp: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            name,
            python_module("tools.tgi_double", "--port", str(self.port),
                          "--model-id", f"double/{name}", *flags),
            tmp / f"{name}.log",
            _http_ready(f"{self.url}/health"),
        )

    @property
    def client(self) -> Double:
        assert self.proc is not None
        return Double(self.url, self.proc)

    def control(self, **state: Any) -> None:
        self.client.control(**state)

    def reset(self) -> None:
        self.client.reset()

    def stats(self) -> dict[str, Any]:
        return self.client.stats()


class AdapterPart(Part):
    def __init__(self, name: str, tmp: Path, model: str, double: DoublePart, *flags: str) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.double = double
        super().__init__(
            name,
            python_module("services.adapter", "--model", model, "--tgi-url", double.url,
                          "--port", str(self.port), "--health-interval", "0.25", *flags),
            tmp / f"{name}.log",
            _grpc_ready(self.address),
        )


class RouterPart(Part):
    def __init__(self, tmp: Path, adapters: dict[str, Sequence[str]], *flags: str) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        env = {f"{model.upper()}_ADAPTERS": ",".join(addrs) for model, addrs in adapters.items()}
        # Every model in the registry needs an address; the ones a test does
        # not start point at a port where nothing listens (never ready).
        env.setdefault("QWEN2_ADAPTERS", f"127.0.0.1:{free_port()}")
        env.setdefault("LLAMA3_ADAPTERS", f"127.0.0.1:{free_port()}")
        models = list(adapters)
        super().__init__(
            "router",
            python_module("services.router", "--port", str(self.port),
                          "--health-interval", "0.25", *flags),
            tmp / "router.log",
            _all_ready(self.address, models),
            env=env,
        )


def _all_ready(address: str, models: list[str]) -> Callable[[Part], None]:
    def check(part: Part) -> None:
        for model in models:
            assert health_status(address, model, timeout=0.5) == SERVING

    return check


class EnvoyPart(Part):
    def __init__(self, tmp: Path, router_port: int, openai_port: int | None = None) -> None:
        sys.path.insert(0, str(ROOT / "envoy"))
        import render  # envoy/render.py

        self.port = free_port()
        self.admin = free_port()
        self.http = f"http://127.0.0.1:{self.port}"
        self.address = f"127.0.0.1:{self.port}"
        config = tmp / "envoy.yaml"
        config.write_text(render.render(
            LISTEN_PORT=self.port, ADMIN_PORT=self.admin, ROUTER_PORT=router_port,
            # The router's OpenAI listener (its --openai-port), else a free
            # port where nothing listens: never the default one.
            OPENAI_PORT=openai_port or free_port(),
            DESCRIPTOR=ROOT / "gen" / "llmmesh.binpb"))
        super().__init__(
            "envoy",
            [ENVOY, "-c", str(config), "--disable-hot-restart", "--log-level", "warn"],
            tmp / "envoy.log",
            _http_ready(f"{self.http}/v1/mesh/models"),
        )

    def cluster_stat(self, name: str) -> int:
        """A counter or gauge of the `router` cluster from the admin /stats."""
        url = f"http://127.0.0.1:{self.admin}/stats?filter=^cluster\\.router\\.{name}$"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == f"cluster.router.{name}":
                return int(value)
        raise KeyError(name)


def start_all(parts: Sequence[Part]) -> None:
    """Spawn `parts` together and wait until each is ready."""
    for part in parts:
        part.spawn()
    for part in parts:
        part.wait_ready(60)


def stop_all(parts: Sequence[Part]) -> None:
    """Stop `parts` in reverse order, in parallel where it is safe (always is here)."""
    with ThreadPoolExecutor(len(parts) or 1) as pool:
        list(pool.map(lambda p: p.stop(5), reversed(parts)))


def stub(address: str) -> pb_grpc.GenerateServiceStub:
    """A stub on a channel of its own (closed when garbage-collected)."""
    return pb_grpc.GenerateServiceStub(grpc.insecure_channel(address))


def ready_replicas(address: str, model: str) -> int:
    """How many replicas of `model` the router at `address` counts as serving."""
    reply = stub(address).GetModel(pb.GetModelRequest(model_id=model), timeout=5)
    return int(reply.model.ready_replicas)


def error_details(error: grpc.RpcError) -> dict[str, Any]:
    """The ErrorInfo reason and the RetryInfo delay (seconds) of a rich status."""
    out: dict[str, Any] = {"reason": None, "retry_delay": None, "violations": []}
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out["reason"] = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            out["retry_delay"] = retry.retry_delay.ToMilliseconds() / 1000
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out["violations"] = [v.field for v in bad.field_violations]
    return out


class HealthWatch:
    """grpc.health.v1 Watch on `address` in a thread: every status with its time."""

    def __init__(self, address: str, service: str = "") -> None:
        self.events: list[tuple[float, int]] = []
        self._channel = grpc.insecure_channel(address)
        self._call = health_pb2_grpc.HealthStub(self._channel).Watch(
            health_pb2.HealthCheckRequest(service=service))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for reply in self._call:
                self.events.append((time.monotonic(), int(reply.status)))
        except grpc.RpcError:
            pass  # the server went away, or close()

    def first(self, status: int) -> float | None:
        """When `status` was first reported."""
        return next((t for t, s in self.events if s == status), None)

    def close(self) -> None:
        self._call.cancel()
        self._channel.close()


def http_json(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, str, bytes]:
    """(status, content type, raw body) of one HTTP request; errors are answers too."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.headers.get("content-type", ""), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("content-type", ""), err.read()


def sse_events(url: str, body: dict[str, Any], timeout: float = 30.0,
               headers: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """The JSON events of a Server-Sent Events response, as they arrive."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        assert resp.headers["content-type"] == "text/event-stream"
        for line in resp:
            if line.startswith(b"data:"):
                yield json.loads(line[5:])


__all__ = [
    "NOT_SERVING",
    "ROOT",
    "SERVING",
    "AdapterPart",
    "DoublePart",
    "EnvoyPart",
    "HealthWatch",
    "Part",
    "RouterPart",
    "error_details",
    "health_status",
    "http_json",
    "ready_replicas",
    "rss_kib",
    "sse_events",
    "start_all",
    "stop_all",
    "stub",
]


def start_edge(tmp: Path, adapters: dict[str, Sequence[str]]) -> tuple[RouterPart, EnvoyPart]:
    """A router over `adapters` with its OpenAI listener, and Envoy in front
    of both, started in that order."""
    openai_port = free_port()
    router = RouterPart(tmp, adapters, "--openai-port", str(openai_port))
    router.start(60)
    envoy = EnvoyPart(tmp, router.port, openai_port)
    try:
        envoy.start(60)
    except BaseException:
        router.stop()
        raise
    return router, envoy
