"""`make bench` counts only complete successes: its reply checks, in Python
and in wrk's Lua script, pass a good reply and fail a wrong one."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bench.mesh_bench import BACKEND, PATHS, nearest_rank, wrk
from tests.harness.procs import free_port, python_module, start, stop, wait_http


def test_python_checks_accept_any_spacing_and_refuse_wrong_figures() -> None:
    native = PATHS[0]
    assert native.ok(200, b'{"tokens":16,"finish_reason":"FINISH_REASON_LENGTH"}')
    assert native.ok(200, b'{"tokens": 16, "finish_reason": "FINISH_REASON_LENGTH"}')
    assert not native.ok(200, b'{"tokens":160,"finish_reason":"FINISH_REASON_LENGTH"}')
    assert not native.ok(200, b'{"tokens":16,"finish_reason":"FINISH_REASON_EOS_TOKEN"}')
    assert not native.ok(429, b'{"tokens":16,"finish_reason":"FINISH_REASON_LENGTH"}')
    openai = PATHS[1]
    assert openai.ok(200, b'{"finish_reason": "length", "usage": {"completion_tokens": 16}}')


def test_nearest_rank_is_never_one_rank_high() -> None:
    assert nearest_rank([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert nearest_rank([float(i) for i in range(1, 101)], 99) == 99.0


@pytest.fixture(scope="module")
def lean() -> Iterator[tuple[str, int]]:
    port = free_port()
    proc = start(python_module("tools.lean_tgi_double", "--port", str(port)))
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 30, proc)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        stop(proc)


@pytest.mark.needs("wrk")
def test_wrk_counts_successes_and_refuses_wrong_replies(
    lean: tuple[str, int], tmp_path: Path
) -> None:
    url, pid = lean
    good = wrk(url, BACKEND, 2, 1, {"double": pid}, tmp_path)
    assert good.successes > 0 and good.failures == 0
    assert good.cpu_ms["double"] >= 0 and "wrk" in good.cpu_ms
    wrong = dataclasses.replace(BACKEND, fields=(("generated_tokens", "17"),))
    bad = wrk(url, wrong, 2, 1, {"double": pid}, tmp_path)
    assert bad.successes == 0 and bad.failures > 0
