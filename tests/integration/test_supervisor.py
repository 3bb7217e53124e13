"""The launcher's supervision, over small real processes (Python's http.server
stands in for a service: it is ready when it answers GET /), with a clock the
test moves so that backoff delays take no time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.launcher import __main__ as launcher_main
from services.launcher.model_watch import ModelWatch
from services.launcher.plan import LaunchError, Plan, Ports, Proc, Ready
from services.launcher.supervisor import RestartPolicy, Supervisor
from tests.harness.procs import ROOT, free_port

pytestmark = pytest.mark.timeout(60)


def test_backoff_doubles_from_one_second_up_to_thirty() -> None:
    policy = RestartPolicy()
    assert [policy.backoff(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_the_default_policy_is_the_one_the_launcher_describes() -> None:
    # With the defaults a process that keeps dying waits 1, 2, 4, 8 s and is
    # given up at its 5th death within a minute; the help says exactly that.
    policy = RestartPolicy()
    assert policy.schedule() == (1, 2, 4, 8)
    text = policy.describe()
    assert "started again after 1, 2, 4, 8 s" in text
    assert "at its 5th death within 60 s" in text and "at most 30 s" in text
    parser = launcher_main.parse_args([])
    assert RestartPolicy(delay=parser.restart_delay, max_delay=parser.restart_max_delay,
                         limit=parser.restart_limit, window=parser.restart_window) == policy
    help_text = " ".join(subprocess.run(
        [sys.executable, "-m", "services.launcher", "--help"], cwd=ROOT, capture_output=True,
        text=True, check=True, timeout=60).stdout.split())
    assert " ".join(text.split()) in help_text
    assert "{restarts}" not in help_text
    assert RestartPolicy(limit=3).schedule() == (1, 2)
    assert "at its 3rd death" in RestartPolicy(limit=3).describe()
    assert "at its 1st death" in RestartPolicy(limit=1).describe()


@pytest.mark.parametrize("values", [
    {"delay": 2.0, "max_delay": 1.0}, {"limit": 0}, {"window": 0.0}, {"delay": -1.0},
])
def test_a_policy_that_cannot_work_is_refused(values: dict[str, float]) -> None:
    with pytest.raises(LaunchError):
        RestartPolicy(**values)  # type: ignore[arg-type]


def http_server(name: str, tmp: Path, stage: int = 0) -> Proc:
    port = free_port()
    return Proc(
        name=name, stage=stage, ports=(port,),
        argv=(sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port),
              "-d", str(tmp)),
        ready=Ready("http", f"http://127.0.0.1:{port}/"),
    )


def make_plan(tmp: Path, *procs: Proc) -> Plan:
    (tmp / "logs").mkdir(exist_ok=True)
    return Plan(procs=procs, host="127.0.0.1", ports=Ports(), run_dir=tmp, models=(),
                cpu_models=(), backends={}, prometheus=False)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[tuple[Supervisor, list[str], Clock]]:
    lines: list[str] = []
    clock = Clock()
    plan = make_plan(tmp_path, http_server("one", tmp_path), http_server("two", tmp_path, 1))
    sup = Supervisor(plan, log=lines.append, clock=clock,
                     policy=RestartPolicy(delay=1, max_delay=3, limit=4, window=60))
    try:
        assert sup.start_all(ready_timeout=30)
        yield sup, lines, clock
    finally:
        sup.shutdown()


def tick_until(sup: Supervisor, lines: list[str], text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        assert time.monotonic() < deadline, "\n".join(lines)
        sup.tick()
        time.sleep(0.05)


def kill(sup: Supervisor, name: str) -> int:
    pid = sup.pid(name)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_dead_process_comes_back_after_a_delay_that_doubles(
    supervised: tuple[Supervisor, list[str], Clock],
) -> None:
    sup, lines, clock = supervised
    other = sup.pid("two")
    for delay in (1, 2, 3):  # 4 would exceed max_delay=3
        lines.clear()
        old = kill(sup, "one")
        tick_until(sup, lines, f"restarting one in {delay} s")
        assert "one exited with code -9 (SIGKILL)" in lines[0]
        assert "last lines of" in lines[0]
        clock.now += delay - 0.1
        for _ in range(3):
            sup.tick()
        assert sup.pid("one") is None  # not before its time
        clock.now += 0.1
        tick_until(sup, lines, "restarted one (pid")
        assert sup.pid("one") not in (None, old)
        tick_until(sup, lines, "one serves again")
    assert sup.pid("two") == other  # untouched throughout


def test_it_gives_up_after_repeated_deaths_and_the_rest_keeps_running(
    supervised: tuple[Supervisor, list[str], Clock],
) -> None:
    sup, lines, clock = supervised
    other = sup.pid("two")
    for _ in range(3):
        kill(sup, "one")
        tick_until(sup, lines, "restarting one")
        lines.clear()
        clock.now += 10
        tick_until(sup, lines, "restarted one")
    kill(sup, "one")
    tick_until(sup, lines, "GIVING UP on one")
    assert "it died 4 times within 60 s" in lines[-1]
    clock.now += 100
    for _ in range(5):
        sup.tick()
    assert sup.pid("one") is None
    assert sup.pid("two") == other


def test_deaths_outside_the_window_are_forgotten(
    supervised: tuple[Supervisor, list[str], Clock],
) -> None:
    sup, lines, clock = supervised
    for _ in range(6):  # more than the limit, but each a minute apart
        lines.clear()
        kill(sup, "one")
        tick_until(sup, lines, "restarting one in 1 s")
        clock.now += 61
        tick_until(sup, lines, "restarted one")
    assert not any("GIVING UP" in line for line in lines)


def test_shutdown_stops_everything_and_cancels_a_pending_restart(
    supervised: tuple[Supervisor, list[str], Clock],
) -> None:
    sup, lines, clock = supervised
    pid_two = sup.pid("two")
    kill(sup, "one")
    tick_until(sup, lines, "restarting one")
    sup.shutdown()
    clock.now += 100
    sup.tick()
    assert sup.pid("one") is None and sup.pid("two") is None
    assert pid_two is not None and not Path(f"/proc/{pid_two}").exists()
    assert lines[-1] == "stopped"


def slow_http_server(name: str, tmp: Path, stage: int, after: float) -> Proc:
    """An HTTP server that starts serving only `after` seconds after its start."""
    server = http_server(name, tmp, stage)
    script = (f"import time; time.sleep({after});"
              "import runpy, sys; sys.argv = ['http.server', *sys.argv[1:]];"
              "runpy.run_module('http.server', run_name='__main__')")
    return Proc(name=name, stage=stage, ports=server.ports, ready=server.ready,
                argv=(sys.executable, "-c", script, *server.argv[3:]))


def test_a_ready_process_is_supervised_while_later_stages_still_start(tmp_path: Path) -> None:
    # "one" is ready; "two" takes seconds. "one" killed meanwhile is restarted,
    # and the launch goes on instead of stopping the mesh.
    lines: list[str] = []
    plan = make_plan(tmp_path, http_server("one", tmp_path),
                     slow_http_server("two", tmp_path, 1, after=4.0))
    sup = Supervisor(plan, log=lines.append,
                     policy=RestartPolicy(delay=0.2, max_delay=1, limit=4, window=60))
    killed: list[int] = []

    def kill_one_once_ready() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any("one is ready" in x for x in lines):
            time.sleep(0.05)
        killed.append(kill(sup, "one"))

    killer = threading.Thread(target=kill_one_once_ready)
    try:
        killer.start()
        assert sup.start_all(ready_timeout=30)
        killer.join()
        tick_until(sup, lines, "one serves again")
    finally:
        sup.shutdown()
    text = "\n".join(lines)
    assert killed and "one exited with code -9 (SIGKILL)" in text
    assert "restarting one in 0.2 s" in text and "restarted one (pid" in text
    assert text.index("restarted one") < text.index("two is ready")  # during the start


def test_a_death_while_starting_stops_the_launch_with_the_log(tmp_path: Path) -> None:
    dying = Proc(name="dying", stage=1, ports=(),
                 argv=(sys.executable, "-c",
                       "import sys; print('cannot load the model'); sys.exit(3)"),
                 ready=Ready("http", "http://127.0.0.1:1/"))
    sup = Supervisor(make_plan(tmp_path, http_server("one", tmp_path), dying), log=print)
    try:
        with pytest.raises(LaunchError) as caught:
            sup.start_all(ready_timeout=30)
    finally:
        sup.shutdown()
    message = str(caught.value)
    assert "dying exited with code 3" in message and "cannot load the model" in message


def test_children_inherit_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tracing and log settings reach every process: OTEL_*, LLMMESH_*.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    server = http_server("one", tmp_path)
    script = ("import os; print('otel=' + os.environ['OTEL_EXPORTER_OTLP_ENDPOINT'], flush=True);"
              "import runpy, sys; sys.argv = ['http.server', *sys.argv[1:]];"
              "runpy.run_module('http.server', run_name='__main__')")
    proc = Proc(name="one", stage=0, ports=server.ports, ready=server.ready,
                argv=(sys.executable, "-c", script, *server.argv[3:]))
    sup = Supervisor(make_plan(tmp_path, proc), log=print)
    try:
        assert sup.start_all(ready_timeout=30)
    finally:
        sup.shutdown()
    assert "otel=http://collector:4317" in (tmp_path / "logs" / "one.log").read_text()


def test_a_model_without_a_serving_replica_is_said_with_the_time_and_again_when_back() -> None:
    states: dict[str, bool] | None = {"qwen2": True, "llama3": True}
    lines: list[str] = []
    clock = Clock()
    wall = [1_780_000_000.0]  # 2026-05-28 20:26:40 UTC
    watch = ModelWatch(("qwen2", "llama3"), lambda: states, lines.append,
                       detail=lambda m: f"not serving: backend-{m}-1, backend-{m}-2",
                       interval=0.5, clock=clock, wall=lambda: wall[0])
    watch.tick()
    assert lines == []
    states = {"qwen2": False, "llama3": True}
    watch.tick()
    assert lines == []  # not polled again before the interval
    clock.now += 0.5
    watch.tick()
    (down,) = lines
    assert down.startswith("MODEL DOWN: qwen2 has no serving replica since 20:26:40 UTC")
    assert "not serving: backend-qwen2-1, backend-qwen2-2" in down
    assert "llama3" not in down
    for _ in range(3):  # said once, not on every poll
        clock.now += 0.5
        watch.tick()
    assert len(lines) == 1 and set(watch.down) == {"qwen2"}
    states = None  # the router does not answer: nothing is concluded
    clock.now += 0.5
    watch.tick()
    assert len(lines) == 1
    states = {"qwen2": True, "llama3": True}
    clock.now += 5.0
    wall[0] += 7
    watch.tick()
    assert lines[1] == ("model qwen2 serves again at 20:26:47 UTC, after 7.0 s without a "
                        "serving replica (down since 20:26:40 UTC)")
    assert watch.down == {}
