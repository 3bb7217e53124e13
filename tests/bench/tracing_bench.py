"""What tracing costs: the mesh with tracing off, and on (exporting to a local
OTLP receiver), against a zero-delay TGI double.

    python -m tests.bench.tracing_bench [--runs 2] [--quick] [--json out.json]

For each mode the whole mesh (two TGI doubles, the launcher's adapters,
router and Envoy) is started with or without OTEL_EXPORTER_OTLP_ENDPOINT,
then: unary latency at concurrency 1 through Envoy (HTTP/JSON) and through
the router (gRPC); throughput through Envoy at concurrency 32, with the CPU
milliseconds each process spends per request; and, on, the spans received
per request. Modes alternate (off, on, off, on, ...) and every figure is the
median over --runs. Also: the time `tracing.setup()` takes when on (the SDK
and exporter imports), which off is zero.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from llmmesh.v1 import generate_pb2 as pb
from llmmesh.v1 import generate_pb2_grpc as pb_grpc

from scripts.otlp_receiver import OtlpReceiver
from tests.bench.mesh_bench import cpu_seconds, processes
from tests.harness.mesh import Mesh, start_doubles, start_mesh, stop_mesh
from tests.harness.procs import ROOT, stop
from tools.loadtest.stats import nearest_rank

PROMPT = "one two three four five six seven eight"  # the double echoes it: 8 tokens
CLK_TCK = os.sysconf("SC_CLK_TCK")


def ms_percentiles(samples: list[float]) -> dict[str, float]:
    return {f"p{q}": nearest_rank(samples, q) * 1000 for q in (50, 99)}


async def latency(call: Callable[[], Awaitable[bool]], n: int) -> dict[str, float]:
    for _ in range(20):
        await call()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        if not await call():
            raise RuntimeError("a request failed")
        samples.append(time.perf_counter() - started)
    return ms_percentiles(samples)


async def throughput(
    call: Callable[[], Awaitable[bool]], total: int, concurrency: int, pids: dict[str, int]
) -> dict[str, Any]:
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    remaining = total
    errors = 0

    async def worker() -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            try:
                ok = await asyncio.wait_for(call(), 30)
            except Exception:
                ok = False
            errors += not ok

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu = {name: round((cpu_seconds(pid) - before[name]) / total * 1000, 3)
           for name, pid in pids.items()}
    return {"rps": total / elapsed, "errors": errors, "cpu_ms": cpu}


async def measure(mesh: Mesh, quick: bool) -> dict[str, Any]:
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
    channel = grpc.aio.insecure_channel(mesh.router)
    router = pb_grpc.GenerateServiceStub(channel)
    body = json.dumps({"model_id": "qwen2", "inputs": PROMPT,
                       "parameters": {"max_new_tokens": 16}}).encode()
    request = pb.GenerateRequest(model_id="qwen2", inputs=PROMPT,
                                 parameters=pb.GenerationParameters(max_new_tokens=16))

    async def envoy_http() -> bool:
        async with http.post(f"{mesh.http}/v1/generate", data=body,
                             headers={"Content-Type": "application/json"}) as resp:
            await resp.read()
            return resp.status == 200

    async def router_grpc() -> bool:
        return (await router.Generate(request, timeout=30)).tokens > 0

    n = 100 if quick else 400
    try:
        return {
            "envoy_http_c1": await latency(envoy_http, n),
            "router_grpc_c1": await latency(router_grpc, n),
            "envoy_http_c32": await throughput(envoy_http, 600 if quick else 3000, 32,
                                               processes(mesh)),
            "requests": 40 + 2 * n + (600 if quick else 3000),
        }
    finally:
        await http.close()
        await channel.close()


def one_run(traced: bool, quick: bool) -> dict[str, Any]:
    receiver = OtlpReceiver() if traced else None
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        del os.environ[key]
    if receiver is not None:
        receiver.start()
        # Children inherit these (the launcher passes its environment on, and
        # renders Envoy's tracer from it). gRPC export, default batching.
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{receiver.grpc_port}"
        os.environ["OTEL_EXPORTER_OTLP_PROTOCOL"] = "grpc"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            doubles = start_doubles(Path(tmp))
            try:
                mesh = start_mesh(Path(tmp), doubles)
                try:
                    result = asyncio.run(measure(mesh, quick))
                finally:
                    stop_mesh(mesh)  # flushes the exporters
            finally:
                for double in doubles.values():
                    stop(double.proc)
        if receiver is not None:
            time.sleep(1.0)
            spans = receiver.spans
            generations = [s for s in spans
                           if s["service"] == "router" and s["kind"] == "SERVER"
                           and s["name"].startswith("chat ")]
            result["spans"] = len(spans)
            result["spans_per_request"] = len(spans) / max(1, len(generations))
            result["traced_requests"] = len(generations)
        return result
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if receiver is not None:
            receiver.stop()


def setup_ms() -> float:
    """Milliseconds `tracing.setup()` takes when on (imports the SDK and exporter)."""
    code = ("import time, services.common.tracing as t\n"
            "s = time.perf_counter(); t.setup('router'); print((time.perf_counter() - s) * 1000)")
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 cwd=ROOT, env=env, check=True, timeout=60).stdout.split()[-1])
            for _ in range(3)]
    return statistics.median(runs)


def median_of(runs: list[dict[str, Any]], *path: str) -> float:
    values = []
    for run in runs:
        node: Any = run
        for key in path:
            node = node[key]
        values.append(float(node))
    return statistics.median(values)


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for _ in range(args.runs):
        for mode in ("off", "on"):
            runs[mode].append(one_run(mode == "on", args.quick))
    results: dict[str, Any] = {"runs": runs, "setup_ms_on": setup_ms()}
    print("tracing off vs on (OTLP/gRPC to a local receiver), medians of", args.runs, "runs")
    print(f"{'':34} {'off':>9} {'on':>9} {'added':>9}")
    for label, path in (
        ("Envoy HTTP c=1 p50 ms", ("envoy_http_c1", "p50")),
        ("Envoy HTTP c=1 p99 ms", ("envoy_http_c1", "p99")),
        ("router gRPC c=1 p50 ms", ("router_grpc_c1", "p50")),
        ("router gRPC c=1 p99 ms", ("router_grpc_c1", "p99")),
        ("Envoy HTTP c=32 req/s", ("envoy_http_c32", "rps")),
    ):
        off, on = median_of(runs["off"], *path), median_of(runs["on"], *path)
        results[label] = {"off": off, "on": on}
        print(f"{label:34} {off:9.2f} {on:9.2f} {on - off:+9.2f}")
    for name in sorted(runs["off"][0]["envoy_http_c32"]["cpu_ms"]):
        path = ("envoy_http_c32", "cpu_ms", name)
        off, on = median_of(runs["off"], *path), median_of(runs["on"], *path)
        label = f"CPU ms/request, {name}"
        results[label] = {"off": off, "on": on}
        print(f"{label:34} {off:9.3f} {on:9.3f} {on - off:+9.3f}")
    errors = sum(r["envoy_http_c32"]["errors"] for rs in runs.values() for r in rs)
    print(f"errors: {errors}; spans per traced request (on): "
          f"{median_of(runs['on'], 'spans_per_request'):.1f}; "
          f"tracing.setup() when on: {results['setup_ms_on']:.0f} ms (off: nothing imported)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
