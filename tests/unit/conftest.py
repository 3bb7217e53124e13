"""tests/unit holds in-process tests only: one that starts a process (a tool,
a service, pip, make) fails here, naming where it belongs."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def no_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(
            f"tests/unit starts no process (here: {args[1:2]!r}); a test that runs a program "
            "belongs in tests/programs, one that starts the services in tests/integration")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    yield
