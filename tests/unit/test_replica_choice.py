"""The router's choice of replica, the engine load it reads, and the
simulation that compares the policies (tests/bench/replica_bench.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp

from services.adapter.engine_load import LoadSampler, parse_load
from services.common.types import EngineLoad
from services.router.choice import choose, estimated_requests
from tests.bench import replica_bench
from tools.loadtest.stats import nearest_rank
from tools.tgi_double import Control, serve


@dataclass(eq=False)
class R:
    in_flight: int = 0
    load: EngineLoad | None = None
    in_flight_at_report: int = 0


def test_least_in_flight_ignores_engine_load():
    busy, idle = R(1, EngineLoad(waiting=9, running=4)), R(2)
    assert choose([busy, idle], "in-flight", 0) is busy


def test_engine_load_outweighs_the_routers_own_count():
    busy, idle = R(1, EngineLoad(waiting=9, running=4), 1), R(2, EngineLoad(running=2), 2)
    assert choose([busy, idle], "load", 0) is idle


def test_requests_since_the_report_count_on_top_of_it():
    r = R(in_flight=5, load=EngineLoad(waiting=1, running=3), in_flight_at_report=2)
    assert estimated_requests(r) == 4 + 3
    # Requests that ended since the report never take it below the router's own.
    r = R(in_flight=1, load=EngineLoad(running=1), in_flight_at_report=4)
    assert estimated_requests(r) == 1


def test_a_full_kv_cache_ranks_last():
    full = R(0, EngineLoad(running=1, kv_cache_usage=0.95))
    busy = R(0, EngineLoad(waiting=3, running=4, kv_cache_usage=0.5))
    assert choose([full, busy], "load", 0) is busy


def test_replicas_without_reports_fall_back_to_the_routers_count():
    silent, reporting = R(1), R(0, EngineLoad(waiting=2, running=2))
    assert choose([silent, reporting], "load", 0) is silent
    a, b = R(0), R(0)
    assert {choose([a, b], "load", turn) for turn in (0, 1)} == {a, b}  # ties take turns
    assert choose([], "load", 0) is None


def test_parse_load_of_each_engine():
    tgi = "# TYPE tgi_queue_size gauge\ntgi_queue_size 3\ntgi_batch_current_size 2\n"
    assert parse_load(tgi) == EngineLoad(waiting=3, running=2)
    vllm = (
        'vllm:num_requests_running{engine="0",model_name="m"} 4.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 1.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75\n'
        'vllm:num_requests_waiting_by_reason{reason="x"} 9\n'
    )
    assert parse_load(vllm) == EngineLoad(waiting=2, running=5, kv_cache_usage=0.75)
    assert parse_load("process_cpu_seconds_total 1.5\n") is None
    assert parse_load("") is None


def test_simulation_load_aware_beats_least_in_flight_under_outside_load():
    aware = replica_bench.simulate("load", seed=1, seconds=600)
    blind = replica_bench.simulate("in-flight", seed=1, seconds=600)
    assert len(aware) == len(blind) > 1000
    assert nearest_rank(aware, 95) < nearest_rank(blind, 95)
    # Without reports the policy is least-in-flight, request for request.
    assert replica_bench.simulate("load", seed=1, seconds=600, reports=False) == blind


async def test_tgis_gauges_count_the_requests_in_the_engine():
    """TGI's tgi_queue_size and tgi_batch_current_size, as the CPU backend's
    HTTP layer (which the TGI double serves) exports them."""
    async with serve() as double:
        double.engine.control = Control(token_delay=0.1)
        sampler = LoadSampler(f"{double.url}/metrics", 0.1)
        async with aiohttp.ClientSession() as session:

            async def generate() -> None:
                body = {"inputs": "a b c d e f g h", "parameters": {"max_new_tokens": 8}}
                async with session.post(f"{double.url}/generate", json=body) as resp:
                    assert resp.status == 200
                    await resp.read()

            held = [asyncio.create_task(generate()) for _ in range(3)]
            try:
                for _ in range(50):
                    load = await sampler.sample()
                    if load is not None and load.requests == 3:
                        break
                    await asyncio.sleep(0.02)
                assert load is not None and load.requests == 3
                assert sampler.current == load
            finally:
                await asyncio.gather(*held)
            after = await sampler.sample()
            assert after is not None and after.requests == 0
        await sampler.close()


# The load gauges of each engine kind, in the engines' own /metrics text
# (the lines around them included), so a renamed gauge fails here.
SGLANG_METRICS = """\
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="meta-llama/Llama-3.1-8B-Instruct"} 8.128902e+06
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct"} 6.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct"} 4.0
# HELP sglang:token_usage The token usage
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.28
# HELP sglang:cache_hit_rate The cache hit rate
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0075
"""
LLAMACPP_METRICS = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 6886
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 3469
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 1
"""


def test_parse_load_of_sglang_and_llama_server():
    assert parse_load(SGLANG_METRICS) == EngineLoad(waiting=4, running=6, kv_cache_usage=0.28)
    assert parse_load(LLAMACPP_METRICS) == EngineLoad(waiting=1, running=2)


async def test_a_server_without_metrics_is_probed_once_and_said_once(caplog):
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    hits = []

    async def missing(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"detail": "Not Found"}, status=404)

    app = web.Application()
    app.router.add_get("/metrics", missing)
    server = TestServer(app, port=0)
    await server.start_server()
    try:
        sampler = LoadSampler(str(server.make_url("/metrics")), 0.01)
        with caplog.at_level("INFO", logger="llmmesh.adapter"):
            await asyncio.wait_for(sampler.run(), 2)  # returns: sampling stopped
        await asyncio.sleep(0.1)
        assert hits == ["/metrics"]
        said = [r for r in caplog.records if "serves no metrics" in r.getMessage()]
        assert len(said) == 1 and sampler.current is None
    finally:
        await server.close()
