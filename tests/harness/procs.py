"""Start, wait for and stop the real processes that tests talk to."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(
    cmd: Sequence[str], env: Mapping[str, str] | None = None, log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start `cmd` from the repo root; stdout and stderr go to `log_path`.

    `env` is added to (not substituted for) the current environment, and the
    repo root is put on PYTHONPATH so `python -m services...` / `tests...` work.
    """
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), full_env.get("PYTHONPATH", "")) if p
    )
    full_env.update(env or {})
    if log_path is None:
        return subprocess.Popen(
            list(cmd), cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
    # The child keeps its own copy of the descriptor; ours can close at once.
    with open(log_path, "wb") as out:
        return subprocess.Popen(
            list(cmd), cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT
        )


def python_module(module: str, *args: str) -> list[str]:
    """Command line running `module` with this interpreter (the venv's)."""
    return [sys.executable, "-m", module, *args]


def wait_http(
    url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None, expect: int = 200
) -> None:
    """Poll `url` until it answers `expect`; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was up")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == expect:
                    return
                last = resp.status
        except urllib.error.HTTPError as exc:
            last = exc.code
            if exc.code == expect:
                return
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} not answering {expect} after {timeout}s (last: {last})")


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> int:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return int(proc.returncode)
