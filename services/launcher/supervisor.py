"""Start the plan's processes stage by stage, wait until each is ready, and
keep each running from the moment it is ready (while later stages still
start): a process that dies is started again after a delay that doubles with
each recent death, and left stopped (said plainly) only when it keeps dying.
A signal stops them all, newest first.

A process that dies before it was ever ready stops the launch with its log's
last lines: such a death is a configuration problem that restarting would
not fix. Once the mesh is up, a model that loses its last serving replica is
said, with the time, and again when it serves (model_watch.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.launcher import configs
from services.launcher.model_watch import ModelWatch
from services.launcher.plan import LaunchError, Plan, Proc, Ready

__all__ = ["LaunchError", "RestartPolicy", "Supervisor"]

GRACE_SECONDS = 10.0
TICK_SECONDS = 0.2
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class RestartPolicy:
    """When to start a dead process again, and when to stop trying.

    The n-th death within `window` seconds waits `delay * 2**(n-1)` seconds
    (at most `max_delay`) before the restart; the `limit`-th death within
    `window` seconds leaves the process stopped.
    """

    delay: float = 1.0
    max_delay: float = 30.0
    limit: int = 5
    window: float = 60.0

    def __post_init__(self) -> None:
        if self.delay < 0 or self.max_delay < self.delay:
            raise LaunchError("restart delays: need 0 <= --restart-delay <= --restart-max-delay")
        if self.limit < 1 or self.window <= 0:
            raise LaunchError("--restart-limit must be >= 1 and --restart-window > 0")

    def backoff(self, deaths: int) -> float:
        return float(min(self.max_delay, self.delay * 2 ** max(0, deaths - 1)))

    def schedule(self) -> tuple[float, ...]:
        """The delays a process that keeps dying waits, in order, before it is given up."""
        return tuple(self.backoff(n) for n in range(1, self.limit))

    def describe(self) -> str:
        """The policy in words, for the launcher's help and docs."""
        delays = ", ".join(f"{d:g}" for d in self.schedule())
        text = (f"A process that dies after it was ready is started again after "
                f"{delays} s as it keeps dying" if delays else
                "A process that dies after it was ready is not started again")
        return (f"{text}, and left stopped (with a plain message; the rest keeps serving) "
                f"at its {_ordinal(self.limit)} death within {self.window:g} s. Each delay doubles "
                f"the one before, at most {self.max_delay:g} s.")


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


@dataclass
class _Child:
    """One process of the plan and its life so far."""

    proc: Proc
    popen: subprocess.Popen[bytes] | None = None
    deaths: deque[float] = field(default_factory=deque)
    restart_at: float | None = None  # a restart is due at this time
    died_at: float | None = None  # the last death not yet followed by readiness
    given_up: bool = False
    was_ready: bool = False  # ready once: from then on a death means a restart

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.returncode is None


# Loaded once here: between fork and exec (where _die_with_parent runs) the
# child must not dlopen while another thread (gRPC's) may hold the loader's lock.
_LIBC = ctypes.CDLL("libc.so.6", use_errno=True)


def _die_with_parent() -> None:
    # Children live in their own session (so the launcher orders the shutdown),
    # and the kernel still stops them if the launcher itself is killed.
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    def __init__(
        self,
        plan: Plan,
        log: Callable[[str], None] = print,
        policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plan = plan
        self.policy = policy or RestartPolicy()
        self._log = log
        self._clock = clock
        self._children = {p.name: _Child(p) for p in plan.procs}
        self._stop = False
        router = self._children.get("router")
        self.models: ModelWatch | None = None
        if router is not None and plan.models:
            self.models = ModelWatch(
                plan.models, functools.partial(self._router_models, router), log,
                detail=self._model_detail,
            )

    def request_stop(self) -> None:
        self._stop = True

    # -- the whole life ----------------------------------------------------------

    def run(self, ready_timeout: float = 180.0) -> int:
        self._check_ports()
        self.plan.log_dir.mkdir(parents=True, exist_ok=True)
        configs.write(self.plan)
        for note in self.plan.notes:
            self._log(note)
        try:
            if not self.start_all(ready_timeout):
                return 130
            self._log(configs.banner(self.plan))
            return self._watch()
        finally:
            self.shutdown()

    def start_all(self, ready_timeout: float) -> bool:
        """Start stage after stage, each once the one before is ready. False when
        a stop was requested meanwhile; LaunchError when a process dies or a
        stage is not ready in time."""
        for stage in sorted({p.stage for p in self.plan.procs}):
            procs = [p for p in self.plan.procs if p.stage == stage]
            for proc in procs:
                self._start(self._children[proc.name])
            self._wait_ready(procs, ready_timeout)
            if self._stop:
                return False
        return True

    def pid(self, name: str) -> int | None:
        """The process id of a running process of the plan."""
        child = self._children[name]
        return child.popen.pid if child.running and child.popen is not None else None

    def _watch(self) -> int:
        """Until a stop is requested: restart what dies, report what serves again."""
        while not self._stop:
            self.tick()
            if self.models is not None:
                self.models.tick()
            if all(c.given_up for c in self._children.values()):
                self._log("every process has been given up; stopping")
                return 1
            time.sleep(TICK_SECONDS)
        return 1 if any(c.given_up for c in self._children.values()) else 0

    def tick(self) -> None:
        """One round of supervision over every process, in the plan's order."""
        for child in self._children.values():
            if self._stop:
                return
            if child.running:
                assert child.popen is not None
                if not child.was_ready:
                    continue  # still starting: a death there stops the launch
                if child.popen.poll() is not None:
                    self._on_death(child)
                elif child.died_at is not None and is_ready(child.proc.ready, whole=False):
                    self._log(
                        f"{child.proc.name} serves again, "
                        f"{self._clock() - child.died_at:.1f} s after it died"
                    )
                    child.died_at = None
            elif child.restart_at is not None and self._clock() >= child.restart_at:
                child.restart_at = None
                self._start(child, again=True)

    def _router_models(self, router: _Child) -> dict[str, bool] | None:
        """What the router says it can serve, once it serves (a router that has
        just started again says no model until its first health round)."""
        if not router.was_ready or not router.running or router.died_at is not None:
            return None
        return serving_models(router.proc.ready, self.plan.models)

    def _model_detail(self, model: str) -> str:
        """Which of the model's own processes do not serve, if any."""
        names = [c.proc.name for c in self._children.values() if c.proc.model == model
                 and (not c.running or c.died_at is not None)]
        gave_up = [c.proc.name for c in self._children.values()
                   if c.proc.model == model and c.given_up]
        if not names:
            return ""
        text = f"not serving: {', '.join(names)}"
        return text + (f"; given up: {', '.join(gave_up)}" if gave_up else "; restarting")

    def _on_death(self, child: _Child) -> None:
        assert child.popen is not None
        now = self._clock()
        _kill_group(child.popen.pid)  # anything it left behind in its session
        child.deaths.append(now)
        while child.deaths and child.deaths[0] < now - self.policy.window:
            child.deaths.popleft()
        if child.died_at is None:
            child.died_at = now
        n = len(child.deaths)
        name = child.proc.name
        died = self._died(child.proc, child.popen, lines=10)
        if n >= self.policy.limit:
            child.given_up = True
            self._log(
                f"{died}\n"
                f"GIVING UP on {name}: it died {n} times within {self.policy.window:.0f} s, "
                f"so it is not started again. The rest of the mesh keeps running without "
                f"it. Read its log ({self.log_path(child.proc)}), fix the cause, and "
                f"restart `make up` (Ctrl-C stops everything)."
            )
            return
        delay = self.policy.backoff(n)
        child.restart_at = now + delay
        self._log(
            f"{died}\nrestarting {name} in {delay:g} s (death {n} within "
            f"{self.policy.window:.0f} s; at {self.policy.limit} it is given up)"
        )

    def shutdown(self) -> None:
        """SIGTERM each process, newest first; SIGKILL what outlives the grace period."""
        started = [c for c in self._children.values() if c.popen is not None]
        if started:
            self._log("stopping the mesh ...")
        for child in reversed(started):
            popen = child.popen
            assert popen is not None
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
                try:
                    popen.wait(GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    self._log(
                        f"{child.proc.name} did not stop in {GRACE_SECONDS:.0f}s; killing it"
                    )
                    popen.kill()
                    popen.wait()
            _kill_group(popen.pid)
            child.popen = None
            child.restart_at = None
        if started:
            self._log("stopped")

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

    def _start(self, child: _Child, again: bool = False) -> None:
        proc = child.proc
        # Children inherit the launcher's environment (OTEL_*, LLMMESH_* ...).
        env = {**os.environ, **proc.env, "PYTHONUNBUFFERED": "1"}
        with self.log_path(proc).open("ab") as out:
            child.popen = subprocess.Popen(
                proc.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=configs.ROOT, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        verb = "restarted" if again else "started"
        self._log(f"{verb} {proc.name} (pid {child.popen.pid}), log: {self.log_path(proc)}")

    def _wait_ready(self, procs: list[Proc], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = list(procs)
        while waiting and not self._stop:
            for child in self._children.values():
                popen = child.popen
                if not child.was_ready and popen is not None and popen.poll() is not None:
                    raise LaunchError(self._died(child.proc, popen))
            # What was ready once is supervised already: restarted if it died.
            self.tick()
            if self.models is not None:
                self.models.tick()
            for proc in list(waiting):
                child = self._children[proc.name]
                if child.running and is_ready(proc.ready):
                    self._log(f"{proc.name} is ready")
                    child.was_ready = True
                    waiting.remove(proc)
            if waiting and time.monotonic() > deadline:
                names = ", ".join(p.name for p in waiting)
                tails = "\n".join(self._tail(p) for p in waiting)
                raise LaunchError(f"not ready after {timeout:.0f}s: {names}\n{tails}")
            time.sleep(TICK_SECONDS)

    def _died(self, proc: Proc, popen: subprocess.Popen[bytes], lines: int = 20) -> str:
        code = popen.returncode
        how = f" ({signal.Signals(-code).name})" if code < 0 and -code in _SIGNALS else ""
        return f"{proc.name} exited with code {code}{how}\n{self._tail(proc, lines)}"

    def _tail(self, proc: Proc, lines: int = 20) -> str:
        try:
            text = self.log_path(proc).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return f"  (no log at {self.log_path(proc)})"
        body = "\n".join(f"  | {line}" for line in text.splitlines()[-lines:])
        return f"--- last lines of {self.log_path(proc)}:\n{body}"


_SIGNALS = {int(s) for s in signal.Signals}


def _kill_group(pgid: int) -> None:
    """SIGKILL whatever is left of a child's session (it led its own group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def is_ready(ready: Ready, whole: bool = True) -> bool:
    """Whether a process serves. `whole`: also every model behind it (at start);
    otherwise only the process itself (after a restart)."""
    if ready.kind == "http":
        return _http_ready(ready, whole)
    if ready.kind == "tcp":
        host, _, port = ready.target.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return True
        except OSError:
            return False
    services = ready.services if whole else ready.services[:1]
    statuses = _grpc_health(ready, services)
    return statuses is not None and all(statuses.values())


def serving_models(ready: Ready, models: tuple[str, ...]) -> dict[str, bool] | None:
    """model -> whether the router behind `ready` has a serving replica of it (its
    grpc.health.v1 status per model); None when the router does not answer."""
    return _grpc_health(ready, models)


def _grpc_health(ready: Ready, services: tuple[str, ...]) -> dict[str, bool] | None:
    """service -> SERVING, for each service of a gRPC server; None if it does not answer."""
    tls = ready.tls
    if tls is None:
        channel = grpc.insecure_channel(ready.target)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.ca.read_bytes(),
            private_key=tls.key.read_bytes() if tls.key else None,
            certificate_chain=tls.cert.read_bytes() if tls.cert else None,
        )
        # Dev certificates name localhost and 127.0.0.1, whatever --host is.
        options = [("grpc.ssl_target_name_override", "localhost")]
        channel = grpc.secure_channel(ready.target, credentials, options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return {
                name: stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=1).status
                == health_pb2.HealthCheckResponse.SERVING
                for name in services
            }
        except grpc.RpcError:
            return None


def _http_ready(ready: Ready, whole: bool) -> bool:
    headers = {"Authorization": ready.authorization} if ready.authorization else {}
    context = None
    if ready.tls is not None:
        context = ssl.create_default_context(cafile=str(ready.tls.ca))
        context.check_hostname = False  # the CA is ours; --host may be any address
    try:
        request = urllib.request.Request(ready.target, headers=headers)
        with urllib.request.urlopen(request, timeout=1, context=context) as resp:
            if resp.status != 200:
                return False
            if whole and ready.models:
                models = json.loads(resp.read()).get("models", [])
                return bool(models) and all(m.get("ready") for m in models)
            return True
    except (urllib.error.URLError, OSError, ValueError):
        return False
