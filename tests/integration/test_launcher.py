"""`make up`'s launcher when things go wrong: a port in use, a process that
dies while starting, and one that dies while serving."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import running_mesh
from tests.procs import ROOT, free_port

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
    ports = [free_port() for _ in range(6)]
    result = launch(tmp_path, "--model-path", str(broken), "--envoy-port", str(ports[0]),
                    "--admin-port", str(ports[1]), "--router-port", str(ports[2]),
                    "--adapter-port", str(ports[3]), "--backend-port", str(ports[4]),
                    "--metrics-port", str(ports[5]))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "exited with code" in result.stderr and "last lines of" in result.stderr
    assert "stopped" in result.stdout  # what had started was stopped again


def test_a_process_dying_later_stops_the_mesh(tmp_path: Path) -> None:
    with running_mesh(tmp_path) as mesh:
        children = Path(f"/proc/{mesh.launcher.pid}/task/{mesh.launcher.pid}/children")
        pids = [int(p) for p in children.read_text().split()]
        adapter = next(
            pid for pid in pids
            if b"services.adapter" in Path(f"/proc/{pid}/cmdline").read_bytes()
        )
        os.kill(adapter, signal.SIGKILL)
        assert mesh.launcher.wait(60) == 1
        log = (tmp_path / "launcher.log").read_text()
        assert "adapter-" in log and "exited with code -9" in log and "stopped" in log
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
