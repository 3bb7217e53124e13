"""The load test's arithmetic: percentiles, SLOs, arrivals, workloads, options."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import random
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.loadtest import __main__ as cli
from tools.loadtest.arrivals import Step, gaps, parse_steps
from tools.loadtest.clients import Record
from tools.loadtest.engine_metrics import CacheSample, cache_figures, counts_of, parse_counters
from tools.loadtest.engine_metrics import shown as engine_shown
from tools.loadtest.report import table
from tools.loadtest.runner import Bounds, Progress, run_step
from tools.loadtest.stats import SLO, by_model, by_turn, nearest_rank, summarize
from tools.loadtest.workload import (
    SYNTHETIC,
    Distribution,
    Item,
    SharedPrefix,
    Workload,
    load_dataset,
)


def record(model: str = "m", start: float = 0.0, ttft: float = 0.1, tokens: int = 11,
           tpot: float = 0.02, error: str | None = None, limited: bool = False) -> Record:
    r = Record(model=model, start=start)
    if error:
        r.fail(error, rate_limited=limited)
        r.end = start + 0.01
        return r
    r.first = start + ttft
    r.chunks = [(r.first + i * tpot, 1) for i in range(tokens)]
    r.end = r.first + (tokens - 1) * tpot
    r.output_tokens = tokens
    r.finish_reason = "FINISH_REASON_LENGTH"
    return r


def test_nearest_rank_picks_a_measured_value_at_the_right_rank() -> None:
    samples = list(range(1, 101))  # 1..100
    assert nearest_rank(samples, 50) == 50
    assert nearest_rank(samples, 99) == 99
    assert nearest_rank(samples, 100) == 100
    assert nearest_rank([3.0, 1.0, 2.0], 50) == 2.0
    assert nearest_rank([5.0], 99) == 5.0
    assert nearest_rank([1, 2, 3, 4], 25) == 1  # not one rank high
    # The rank rounds up (ceil), never to the nearest: 60% of 4 samples is rank
    # 2.4 -> 3, and 91% of 10 is rank 9.1 -> 10.
    assert nearest_rank([1, 2, 3, 4], 60) == 3
    assert nearest_rank(list(range(1, 11)), 91) == 10
    assert nearest_rank(list(range(1, 11)), 90) == 9
    with pytest.raises(ValueError):
        nearest_rank([], 50)


def test_record_figures_follow_their_definitions() -> None:
    r = record(ttft=0.1, tokens=11, tpot=0.02)
    assert r.ok
    assert r.ttft == pytest.approx(0.1)
    assert r.e2e == pytest.approx(0.3)
    assert r.tpot == pytest.approx(0.02)
    assert r.itls() == pytest.approx([0.02] * 10)


def test_summary_counts_successes_only_and_429s_apart() -> None:
    records = [record(start=i * 0.1) for i in range(8)]
    records += [record(start=0.2, error="http 429 OVERLOADED", limited=True)] * 2
    records += [record(start=0.3, error="in-band UNAVAILABLE INCOMPLETE_GENERATION")]
    s = summarize(records, SLO())
    assert (s["requests"], s["successes"], s["failures"], s["rate_limited"]) == (11, 8, 3, 2)
    assert s["errors"] == {"http 429 OVERLOADED": 2, "in-band UNAVAILABLE INCOMPLETE_GENERATION": 1}
    duration = 0.7 + 0.3  # first start 0, last end 0.7 + 0.3
    assert s["duration_s"] == pytest.approx(duration)
    assert s["request_throughput"] == pytest.approx(8 / duration, rel=1e-3)
    assert s["output_token_throughput"] == pytest.approx(88 / duration, rel=1e-3)
    assert s["ttft_ms"]["p50"] == pytest.approx(100)
    assert s["tpot_ms"]["p99"] == pytest.approx(20)


def test_goodput_counts_successes_within_every_slo() -> None:
    records = [record(start=0, ttft=0.1), record(start=0, ttft=0.6),
               record(start=0, tpot=0.08), record(start=0, error="timeout")]
    s = summarize(records, SLO(ttft_ms=500, tpot_ms=50), duration=2.0)
    assert s["good_requests"] == 1
    assert s["goodput"] == pytest.approx(0.5)
    assert s["good_fraction"] == pytest.approx(0.25)
    assert SLO(e2e_ms=250).met(record(ttft=0.1, tokens=11, tpot=0.02)) is False
    assert SLO(tpot_ms=1).met(record(tokens=1)) is True  # one token: no TPOT to miss


def test_figures_per_model_add_up_to_all() -> None:
    records = [record("a", start=0), record("b", start=0.1), record("b", start=0.2)]
    out = by_model(records, SLO())
    assert set(out) == {"a", "b", "all"}
    assert out["a"]["request_throughput"] + out["b"]["request_throughput"] == pytest.approx(
        out["all"]["request_throughput"])


def test_poisson_gaps_have_the_rate_and_burstiness_spreads_them() -> None:
    def sample(rate: float, shape: float) -> list[float]:
        it = gaps(rate, shape, random.Random(1))
        return [next(it) for _ in range(20000)]

    poisson = sample(4.0, 1.0)
    assert statistics.mean(poisson) == pytest.approx(0.25, rel=0.05)
    cv = statistics.stdev(poisson) / statistics.mean(poisson)
    assert cv == pytest.approx(1.0, rel=0.05)  # exponential gaps
    bursty = sample(4.0, 0.25)
    assert statistics.mean(bursty) == pytest.approx(0.25, rel=0.1)
    assert statistics.stdev(bursty) / statistics.mean(bursty) == pytest.approx(2.0, rel=0.1)
    assert next(gaps(float("inf"), 1.0, random.Random(0))) == 0.0


def test_steps_parse_and_refuse_nonsense() -> None:
    assert parse_steps("rate", "0.5, 2,inf") == [
        Step("rate", 0.5), Step("rate", 2.0), Step("rate", float("inf"))]
    assert parse_steps("concurrency", "1,8")[1].label == "concurrency 8"
    for mode, bad in (("rate", "0"), ("rate", "x"), ("concurrency", "1.5"),
                      ("concurrency", "inf"), ("rate", "-1")):
        with pytest.raises(ValueError):
            parse_steps(mode, bad)


def test_distributions_and_workload_are_seeded() -> None:
    assert Distribution.parse("fixed:7") == Distribution(7, 7)
    assert Distribution.parse("uniform:2:9") == Distribution(2, 9)
    assert Distribution.parse("12") == Distribution(12, 12)
    for bad in ("uniform:9:2", "fixed:0", "normal:3", "fixed:x"):
        with pytest.raises(ValueError):
            Distribution.parse(bad)
    w = Workload(["a", "b"], input_tokens=Distribution(50, 60),
                 output_tokens=Distribution(3, 9), seed=5)
    first = list(itertools.islice(w.items(), 6))
    assert list(itertools.islice(w.items(), 6)) == first
    assert [i.model for i in first] == ["a", "b"] * 3
    assert all(3 <= i.max_tokens <= 9 for i in first)
    assert all(50 <= len(i.prompt.split()) <= 60 for i in first)


def test_the_shipped_dataset_loads_and_fits_the_gpu_context() -> None:
    items = load_dataset(SYNTHETIC)
    assert len(items) >= 50
    # The GPU profile serves 768 prompt + 256 new tokens (docs/deployment.md).
    assert max(i.max_tokens for i in items) <= 256
    assert max(len(i.prompt.split()) for i in items) <= 600


def test_a_bad_dataset_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "output_tokens": 4}) + "\n{\"prompt\": 1}\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:2"):
        load_dataset(path)
    path.write_text(json.dumps({"output_tokens": 4}) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:1: missing field 'prompt'"):
        load_dataset(path)


def test_a_dataset_line_without_output_tokens_takes_them_from_the_option(
    tmp_path: Path,
) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n"
                    + json.dumps({"prompt": "yo", "output_tokens": 7}) + "\n")
    got = load_dataset(path, output_tokens=Distribution(33, 33))
    assert [i.max_tokens for i in got] == [33, 7]
    s = cli.settings_from(["--dataset", str(path), "--output-tokens", "fixed:21"])
    assert s.dataset_items is not None
    assert [i.max_tokens for i in s.dataset_items] == [21, 7]


def test_a_bad_dataset_is_one_line_on_the_command_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"output_tokens": 3}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.settings_from(["--dataset", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{path}:1: missing field 'prompt'" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        cli.settings_from(["--dataset", str(tmp_path / "absent.jsonl")])
    assert "absent.jsonl" in capsys.readouterr().err


def test_options_become_settings_and_bad_ones_exit_with_a_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = cli.settings_from(["--url", "http://h:8000", "--rate", "1,2", "--burstiness", "0.5",
                           "--slo-ttft-ms", "500", "--model", "qwen2, llama3"])
    assert s.grpc_target == "h:8000"
    assert s.models == ("qwen2", "llama3")
    assert [st.value for st in s.steps] == [1.0, 2.0]
    assert s.slo == SLO(ttft_ms=500)
    assert cli.settings_from([]).steps[0] == Step("concurrency", 1)
    for argv in (["--rate", "1", "--concurrency", "2"], ["--requests", "0"],
                 ["--output-tokens", "uniform:5:1"], ["--burstiness", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.settings_from(argv)
        assert exit_info.value.code == 2
    assert "not both" in capsys.readouterr().err


def test_the_table_shows_429s_and_goodput() -> None:
    records = [record(start=0), record(start=0, error="http 429 OVERLOADED", limited=True)]
    results = {"settings": {"slo": {"ttft_ms": 500}},
               "steps": [{"label": "rate 2/s", "models": by_model(records, SLO(ttft_ms=500))}]}
    text = table(results)
    assert "| rate 2/s | m | 1/2 | 1 | http 429 OVERLOADED x1 |" in text
    assert "TTFT <= 500 ms" in text


def test_the_progress_bar_draws_on_the_stream_it_is_given() -> None:
    out = io.StringIO()
    bounds = Bounds(requests=4, duration=60, request_timeout=10)
    progress = Progress(out, "concurrency 2", bounds)
    progress.sent = 2
    progress.update(record(), force=True)
    progress.update(record(error="timeout"), force=True)
    progress.close()
    lines = out.getvalue()
    assert "2/4 done, 0 in flight, 1 failed" in lines
    assert lines.endswith("\n")
    quiet = Progress(None, "x", bounds)
    quiet.update(record(), force=True)  # nowhere to draw: only counts
    assert quiet.done == 1


class SleepyClient:
    """A client whose every request takes `seconds` and yields `tokens` tokens."""

    name = "fake"

    def __init__(self, seconds: float, tokens: int = 4) -> None:
        self.seconds = seconds
        self.tokens = tokens
        self.in_flight = self.peak = 0

    async def run(self, item: Item, record: Record) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            for _ in range(self.tokens):
                await asyncio.sleep(self.seconds / self.tokens)
                record.chunk(1)
            record.output_tokens = self.tokens
            record.finish_reason = "FINISH_REASON_LENGTH"
            record.end = time.perf_counter()
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        return None


def items() -> Iterator[Item]:
    return Workload(["m"], input_tokens=Distribution(4, 4),
                    output_tokens=Distribution(4, 4)).items()


async def test_a_closed_loop_keeps_its_concurrency_and_stops_at_the_request_bound() -> None:
    client = SleepyClient(0.05)
    records = await run_step(client, items(), Step("concurrency", 3),
                             Bounds(requests=7, duration=60, request_timeout=5),
                             progress_out=None)
    assert len(records) == 7 and all(r.ok for r in records)
    assert client.peak == 3


async def test_the_time_bound_stops_sending_and_lets_requests_in_flight_finish() -> None:
    client = SleepyClient(0.2)
    started = time.perf_counter()
    records = await run_step(client, items(), Step("concurrency", 2),
                             Bounds(requests=1000, duration=0.5, request_timeout=5),
                             progress_out=None)
    elapsed = time.perf_counter() - started
    assert 2 <= len(records) <= 8  # 2 clients x about 0.5 s / 0.2 s, far from 1,000
    assert all(r.ok for r in records)  # none cut off
    assert elapsed < 5


async def test_a_rate_sends_on_schedule_and_a_cap_bounds_requests_in_flight() -> None:
    client = SleepyClient(0.2)
    records = await run_step(client, items(), Step("rate", float("inf")),
                             Bounds(requests=6, duration=60, request_timeout=5,
                                    max_concurrency=2), progress_out=None)
    assert len(records) == 6 and client.peak == 2
    client = SleepyClient(0.01)
    started = time.perf_counter()
    records = await run_step(client, items(), Step("rate", 20.0),
                             Bounds(requests=10, duration=60, request_timeout=5),
                             progress_out=None, seed=3)
    # 10 arrivals at 20/s: about half a second, not all at once (wide bounds).
    assert 0.1 < time.perf_counter() - started < 5
    assert len(records) == 10


async def test_with_a_cap_the_clock_starts_when_a_request_was_due_not_when_it_was_sent(
) -> None:
    # All six are due at once; with one in flight at a time the last waits for
    # five before it is sent, and that wait is part of its latency.
    client = SleepyClient(0.1)
    records = await run_step(client, items(), Step("rate", float("inf")),
                             Bounds(requests=6, duration=60, request_timeout=5,
                                    max_concurrency=1), progress_out=None)
    assert client.peak == 1
    e2e = sorted(r.e2e for r in records)
    assert e2e[0] < 0.3
    assert e2e[-1] >= 0.55  # six requests of 0.1 s, one after the other
    starts = [r.start for r in records]
    assert max(starts) - min(starts) < 0.05  # all were due together


async def test_a_request_over_its_timeout_is_a_timeout() -> None:
    records = await run_step(SleepyClient(1.0), items(), Step("concurrency", 1),
                             Bounds(requests=1, duration=60, request_timeout=0.1),
                             progress_out=None)
    assert records[0].error == "timeout" and not records[0].ok


async def test_a_reply_the_client_cannot_read_is_one_failure_not_the_end_of_the_run() -> None:
    class Garbled(SleepyClient):
        async def run(self, item: Item, record: Record) -> None:
            raise KeyError("usage")

    records = await run_step(Garbled(0), items(), Step("concurrency", 2),
                             Bounds(requests=3, duration=60, request_timeout=5),
                             progress_out=None)
    assert [r.error for r in records] == ["bad reply KeyError"] * 3


def test_shared_prefix_conversations_share_system_prompts_and_grow_turn_by_turn() -> None:
    spec = SharedPrefix(prefixes=2, prefix_tokens=200, turns=3, suffix_tokens=8,
                        conversations=4)
    workload = Workload(["a", "b"], output_tokens=Distribution(5, 5), shared_prefix=spec,
                        seed=1)
    got = list(itertools.islice(workload.items(), 4 * 3 + 4))
    first_round, second_round = got[:12], got[12:]
    systems = [item.messages[0] for item in first_round[:4]]
    assert all(role == "system" for role, _ in systems)
    # Conversation c opens with prefix c mod 2: two distinct prompts, each shared.
    assert systems[0] == systems[2] and systems[1] == systems[3] and systems[0] != systems[1]
    assert 190 <= len(systems[0][1].split()) <= 210  # ~200 tokens, as words
    for c in range(4):
        turns = [first_round[t * 4 + c] for t in range(3)]  # every turn t before t + 1
        assert [len(i.messages) for i in turns] == [2, 4, 6]
        for earlier, later in itertools.pairwise(turns):
            assert later.messages[:len(earlier.messages)] == earlier.messages  # it extends
            assert later.messages[len(earlier.messages)][0] == "assistant"
            assert len(later.messages[len(earlier.messages)][1].split()) == 5  # output length
        assert all(i.messages[-1] == ("user", i.prompt) for i in turns)
        assert len(turns[0].prompt.split()) == 8
        assert {i.model for i in turns} == {"ab"[c % 2]}
    # A new round of conversations over the same system prompts.
    assert [len(i.messages) for i in second_round] == [2, 2, 2, 2]
    assert second_round[0].messages[0] == systems[0]
    assert second_round[0].messages[1] != first_round[0].messages[1]
    # Seeded: the same workload sends the same requests.
    again = list(itertools.islice(Workload(["a", "b"], output_tokens=Distribution(5, 5),
                                           shared_prefix=spec, seed=1).items(), 16))
    assert again == got
    assert Item("hi", 3).chat() == [{"role": "user", "content": "hi"}]
    for bad in ({"prefixes": 0}, {"prefixes": 1, "turns": 0},
                {"prefixes": 1, "conversations": 0}, {"prefixes": 1, "suffix_tokens": 0}):
        with pytest.raises(ValueError):
            SharedPrefix(**bad)  # type: ignore[arg-type]


def test_shared_prefix_and_cache_metrics_options() -> None:
    s = cli.settings_from(["--prefixes", "3", "--prefix-tokens", "500", "--turns", "6",
                           "--conversations", "8", "--cache-metrics",
                           "http://h:8081/metrics, http://h:8082/metrics"])
    assert s.shared_prefix == SharedPrefix(3, 500, 6, 32, 8)
    assert s.dataset is None  # the shipped dataset is not used then
    assert s.cache_metrics == ("http://h:8081/metrics", "http://h:8082/metrics")
    assert s.describe()["shared_prefix"]["conversations"] == 8
    assert cli.settings_from([]).shared_prefix is None
    for argv in (["--prefixes", "0"], ["--cache-metrics", "h:8081/metrics"]):
        with pytest.raises(SystemExit):
            cli.settings_from(argv)


VLLM_METRICS = """\
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 500.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 600.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 150.0
vllm:prefix_cache_hits_created{engine="0",model_name="m"} 1.7e9
"""
CPU_METRICS = """\
llmmesh_cpu_prefix_cache_queries_total 200
llmmesh_cpu_prefix_cache_hits_total 50
llmmesh_cpu_prefix_cache_queries_created 1.7e9
"""


def test_engine_cache_counters_are_read_and_summed_over_series() -> None:
    assert counts_of(VLLM_METRICS) == ("vllm", 1500.0, 750.0)
    assert counts_of(CPU_METRICS) == ("llmmesh_cpu", 200.0, 50.0)
    assert counts_of("tgi_request_count 5\n") is None
    assert parse_counters('x{a="b c}"} 2\nx 3\nxy 4\n', {"x"}) == {"x": 5.0}


def test_the_cache_hit_share_is_the_steps_delta_and_na_when_nothing_reports() -> None:
    before = CacheSample({"http://a/metrics": ("llmmesh_cpu", 100.0, 10.0),
                          "http://b/metrics": ("vllm", 0.0, 0.0)})
    after = CacheSample({"http://a/metrics": ("llmmesh_cpu", 300.0, 160.0),
                         "http://b/metrics": ("vllm", 200.0, 50.0)},
                        errors={"http://c/metrics": "HTTP 404"})
    figures = cache_figures(before, after)
    assert figures["hit_share"] == 0.5  # (150 + 50) / (200 + 200)
    assert figures["engines"]["http://a/metrics"]["hit_share"] == 0.75
    assert figures["engines"]["http://c/metrics"] == {"engine": None, "hit_share": None,
                                                       "why": "HTTP 404"}
    assert engine_shown(figures) == "50.0%"
    nothing = cache_figures(CacheSample(), CacheSample())
    assert nothing["hit_share"] is None and engine_shown(nothing) == "n/a"
    assert engine_shown(None) == "n/a"
    idle = cache_figures(before, before)  # counters there, nothing queried
    assert idle["hit_share"] is None
    results = {"settings": {}, "steps": [{"label": "concurrency 2", "cache": figures,
                                          "models": by_model([record()], SLO())}]}
    assert table(results).splitlines()[2].endswith("| - | 50.0% |")


def test_ttft_by_turn_groups_the_turns_of_conversations() -> None:
    records = [record(ttft=0.5), record(ttft=0.1), record(ttft=0.2), record(error="timeout")]
    for r, turn in zip(records, (1, 2, 2, 2), strict=True):
        r.turn = turn
    turns = by_turn(records)
    assert list(turns) == ["1", "2"]
    assert turns["1"]["ttft_ms"]["p50"] == 500
    assert (turns["2"]["requests"], turns["2"]["successes"]) == (3, 2)
    assert turns["2"]["ttft_ms"]["p90"] == 200
    assert by_turn([record()]) == {}
    results = {"settings": {}, "steps": [{"label": "concurrency 2", "turns": turns,
                                          "models": by_model(records, SLO())}]}
    assert "concurrency 2: TTFT p50/p90 by turn: 1: 500/500, 2: 100/200" in table(results)
    spec = SharedPrefix(prefixes=1, prefix_tokens=20, turns=2, suffix_tokens=2)
    items = list(itertools.islice(Workload(["m"], shared_prefix=spec).items(), 3))
    assert [i.turn for i in items] == [1, 2, 1]
