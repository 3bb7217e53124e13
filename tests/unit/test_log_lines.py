"""The per-request log line written directly is the line logging would write."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from services.common import logs


@pytest.fixture
def stdout(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    out = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    for name in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing"):
        monkeypatch.setattr(logging, name, getattr(logging, name))
    monkeypatch.setattr(logs, "_direct", None)
    monkeypatch.setattr("sys.stdout", out)
    logs.setup("router")
    yield out
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_the_direct_line_is_the_records_line(stdout: io.StringIO) -> None:
    log = logging.getLogger("llmmesh.rpc")
    fields = {"method": "Generate", "model": "qwen2", "code": "OK", "tokens": 3}
    logs.info(log, "rpc", fields)
    log.info("rpc", extra={"fields": fields})
    direct, record = (json.loads(line) for line in stdout.getvalue().splitlines())
    assert direct.pop("ts")[:4] == record.pop("ts")[:4]
    assert direct == record == {"level": "info", "service": "router", "logger": "llmmesh.rpc",
                                "msg": "rpc", **fields}


def test_a_quieter_logger_writes_nothing(stdout: io.StringIO) -> None:
    log = logging.getLogger("llmmesh.quiet")
    log.setLevel(logging.WARNING)
    try:
        logs.info(log, "rpc", {"a": 1})
    finally:
        log.setLevel(logging.NOTSET)
    assert stdout.getvalue() == ""
