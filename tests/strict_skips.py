"""A pytest plugin for CI: a skipped test fails the run.

`make test` loads it (`-p tests.strict_skips`). Every test's prerequisites
are installed by `make test` itself (`make venv`, `make prometheus`), so a
skip there means something did not install or a check silently stopped
running. Run without the plugin (`make test-fast`, plain pytest) a skip
stays a skip, with its reason.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest


def _fail(report: Any, what: str) -> None:
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"{what} was skipped, which `make test` does not allow: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        _fail(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator:
    outcome = yield
    report = outcome.get_result()
    if report.skipped:
        _fail(report, collector.nodeid)
