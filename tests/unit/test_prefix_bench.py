"""The shared-prefix bench's own arithmetic: its workload, the cache hits it
reads from engines, and its figures (tests/bench/prefix_bench.py)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.bench import prefix_bench
from tests.bench.prefix_bench import (
    Turn,
    conversations,
    instant_workers,
    kept_share,
    llama_log_hits,
    metric_totals,
    summarize,
)


def test_each_conversation_has_its_own_long_system_prompt():
    convs = conversations(8, 6, 4600)
    assert len({c.system[:300] for c in convs}) == 8
    assert all(4600 <= len(c.system) < 4800 and len(c.questions) == 6 for c in convs)
    assert conversations(8, 6, 4600) == convs  # the same every run


def test_users_pause_between_turns_without_changing_the_text():
    paused = conversations(8, 6, 4600, think_s=2.0)
    at_once = conversations(8, 6, 4600, think_s=0)
    assert [c.system for c in paused] == [c.system for c in at_once]
    assert all(c.pauses == (0.0,) * 6 for c in at_once)
    every = [p for c in paused for p in c.pauses]
    assert len(set(every)) == 48 and 1.0 < sum(every) / 48 < 3.0  # exponential, mean ~2 s


def test_metric_totals_add_the_engines_names_over_series():
    text = (
        "# HELP vllm:prefix_cache_queries_total x\n"
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1200.0\n'
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 900.0\n'
        "llmmesh_cpu_prefix_cache_queries_total 100.0\n"
        "llmmesh_cpu_prefix_cache_hits_total 50.0\n"
        "llmmesh_cpu_prefix_cache_hits_created 1.7e9\n"
        "tgi_request_count 3\n"
    )
    assert metric_totals(text) == (1300.0, 950.0)


def test_llama_log_hits_count_reused_and_evaluated_tokens():
    log = "\n".join([
        "Llama._create_completion: cache miss",
        "llama_perf_context_print: prompt eval time =  1658.91 ms /  1017 tokens (1.63 ms)",
        "Llama.generate: 1016 prefix-match hit, remaining 40 prompt tokens to eval",
        "llama_perf_context_print: prompt eval time =    20.00 ms /    40 tokens (0.5 ms)",
        "Llama.generate: 5 prefix-match hit, remaining 1000 prompt tokens to eval",
        "llama_perf_context_print: prompt eval time =  1600.00 ms /  1000 tokens (1.6 ms)",
    ])
    assert llama_log_hits(log) == {
        "requests": 3, "hit_requests": 1, "queries": 1017 + 1056 + 1005, "hits": 1021,
    }


def test_summary_splits_first_and_later_turns_and_counts_reported_hits():
    turns = [
        Turn(0, 0, ttft=2.0, output_tokens=10, prompt_tokens=1000, cached_tokens=0),
        Turn(0, 1, ttft=0.2, output_tokens=10, prompt_tokens=1100, cached_tokens=1000),
        Turn(0, 2, ttft=1.8, output_tokens=10, prompt_tokens=1200, cached_tokens=16),
        Turn(1, 0, error="HTTP 500: boom"),
    ]
    r = summarize(turns, wall=10.0)
    assert r["failed"] == 1 and r["output_tokens"] == 30 and r["output_tokens_per_s"] == 3.0
    assert r["ttft_first_turn_ms"] == {"p50": 2000.0, "p90": 2000.0}
    assert r["ttft_later_turns_ms"] == {"p50": 200.0, "p90": 1800.0}
    assert r["replies"]["turn_hit_share"] == 0.5
    assert r["replies"]["token_hit_share"] == round(1016 / 3300, 3)


async def test_a_run_against_an_openai_server_reads_streams_and_usage():
    seen: list[list[dict[str, str]]] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body["messages"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for word in ("Hello", " there"):
            await resp.write(b'data: {"choices":[{"delta":{"content":"%s"}}]}\n\n' % word.encode())
        prompt = sum(len(m["content"]) for m in body["messages"])
        cached = 0 if len(body["messages"]) == 2 else prompt - 10
        await resp.write(
            b'data: {"choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":2,'
            b'"prompt_tokens_details":{"cached_tokens":%d}}}\n\n' % (prompt, cached)
        )
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with TestServer(app) as server:
        convs = conversations(2, 3, 500, think_s=0)
        r = await prefix_bench.run(str(server.make_url("")).rstrip("/"), "m", convs, 4)
    assert r["turns"] == 6 and r["failed"] == 0 and r["output_tokens"] == 12
    assert r["replies"]["turn_hit_share"] == 1.0
    # Each turn carries the previous reply in its history.
    assert seen[-1][-2] == {"role": "assistant", "content": "Hello there"}
    assert len(max(seen, key=len)) == 1 + 3 + 2


def test_kept_share_counts_turns_sent_where_the_previous_turn_went():
    assert kept_share({"a": [0, 0, 0], "b": [1, 0, 0]}) == 0.75
    assert kept_share({"a": [1]}) is None


async def test_instant_workers_note_which_worker_each_conversation_reached():
    seen: dict[str, list[int]] = {}
    convs = conversations(2, 2, 300, think_s=0)
    with instant_workers(2, seen, 0.0) as urls:
        for i, url in enumerate(urls):
            r = await prefix_bench.run(url, "m", convs[i:i + 1], 2)
            assert r["failed"] == 0 and r["turns"] == 2
    assert seen == {"assistant of company number 0": [0, 0],
                    "assistant of company number 1": [1, 1]}
