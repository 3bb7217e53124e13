"""How many concurrent streams one router and one adapter relay before time
to first token doubles.

    .venv/bin/python -m tests.bench.relay_bench [--levels 1,50,100,200,400,800]
        [--tokens 60] [--token-delay 0.05] [--budget 150] [--json FILE]
        [--router-bound N] [--via-envoy]

One engine double that admits everything (tools.lean_tgi_double, each
stream `--tokens` tokens at one per `--token-delay` seconds: 60 at 20/s),
one adapter and one router, real processes on free ports, their bounds
raised out of the way; this process opens N streams at once to the router
over gRPC (one channel per 100 streams) and measures each stream's time to
first token and its tokens per second. Levels run in order (all of them,
within the time budget); the figure is the first level whose median TTFT is
twice the single stream's, and the largest level below it. The client
runs on the same cores as the mesh, as a local client would. With
`--via-envoy` the streams go through Envoy (the mesh's config, its limits
just above the router's bound), as the mesh's clients' do. Every answer is
counted by its outcome: OK, RESOURCE_EXHAUSTED (a refusal with its retry
hint) or anything else, which should never happen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from llmmesh.v1 import generate_pb2 as pb
from llmmesh.v1 import generate_pb2_grpc as pb_grpc

from tests.harness.parts import SERVING, health_status
from tests.harness.procs import ROOT, free_port, python_module, start, stop, wait_http

PER_CHANNEL = 100
DETAILS: set[str] = set()  # the messages of errors other than refusals


async def one(stub: pb_grpc.GenerateServiceStub, tokens: int) -> tuple[float, float, str]:
    """(TTFT s, tokens/s after the first, outcome) of one stream."""
    started = time.perf_counter()
    first = last = 0.0
    count = 0
    request = pb.GenerateStreamRequest(
        model_id="qwen2", inputs="w", scenario="raw",
        parameters=pb.GenerationParameters(max_new_tokens=tokens))
    try:
        async for reply in stub.GenerateStream(request, timeout=120):
            now = time.perf_counter()
            if reply.text and not first:
                first = now
            if reply.finish_reason == pb.FINISH_REASON_ERROR:
                return first - started, 0.0, reply.error.reason
            last, count = now, reply.tokens
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            DETAILS.add(f"{exc.code().name}: {exc.details()}")
        return time.perf_counter() - started, 0.0, exc.code().name
    rate = (count - 1) / (last - first) if count > 1 and last > first else 0.0
    return first - started, rate, "OK"


async def level(address: str, n: int, tokens: int) -> dict[str, Any]:
    channels = [grpc.aio.insecure_channel(address) for _ in range((n - 1) // PER_CHANNEL + 1)]
    try:
        stubs = [pb_grpc.GenerateServiceStub(c) for c in channels]
        results = await asyncio.gather(
            *(one(stubs[i // PER_CHANNEL], tokens) for i in range(n)))
    finally:
        for channel in channels:
            await channel.close()
    ok = [r for r in results if r[2] == "OK"]
    ttfts = sorted(r[0] for r in ok)
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r[2]] = outcomes.get(r[2], 0) + 1
    return {
        "streams": n,
        "outcomes": outcomes,
        "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1) if ttfts else None,
        "ttft_p90_ms": round(ttfts[int(0.9 * (len(ttfts) - 1))] * 1000, 1) if ttfts else None,
        "tokens_per_s_p50": round(statistics.median(r[1] for r in ok), 1) if ok else None,
    }


def start_envoy(procs: list[Any], router_port: int, router_bound: int) -> str:
    """Envoy before the router, with the mesh's config; its gRPC address."""
    sys.path.insert(0, str(ROOT / "envoy"))
    import render  # envoy/render.py

    listen, admin = free_port(), free_port()
    config = Path(tempfile.mkdtemp(prefix="relay-envoy-")) / "envoy.yaml"
    config.write_text(render.render(
        ADMIN_PORT=admin, LISTEN_PORT=listen, ROUTER_PORT=router_port,
        OPENAI_PORT=free_port(), DESCRIPTOR=ROOT / "gen" / "llmmesh.binpb",
        EDGE_MAX_REQUESTS=render.edge_max_requests(router_bound)))
    envoy = Path(sys.executable).parent / "envoy"
    procs.append(start([str(envoy), "-c", str(config), "--log-level", "error",
                        "--disable-hot-restart"], log_path=config.with_suffix(".log")))
    deadline = time.monotonic() + 30
    while health_status(f"127.0.0.1:{listen}", "qwen2", timeout=0.5) != SERVING:
        if time.monotonic() > deadline:
            raise SystemExit("Envoy never passed the router's health on")
        time.sleep(0.2)
    return f"127.0.0.1:{listen}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--levels", default="1,50,100,200,400,800,1600,3000")
    parser.add_argument("--tokens", type=int, default=60)
    parser.add_argument("--token-delay", type=float, default=0.05)
    parser.add_argument("--budget", type=float, default=150.0, help="seconds for all levels")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--router-bound", type=int, default=100000,
                        help="the router's --max-in-flight-total (default: out of the way)")
    parser.add_argument("--via-envoy", action="store_true",
                        help="through Envoy, its limits just above the router's bound")
    args, _ = parser.parse_known_args(argv)
    double_port, adapter_port, router_port = free_port(), free_port(), free_port()
    double_url = f"http://127.0.0.1:{double_port}"
    procs = [start(python_module("tools.lean_tgi_double", "--port", str(double_port),
                                 "--max-concurrent-requests", "100000"))]
    figures: dict[str, Any] = {"tokens": args.tokens, "token_delay_s": args.token_delay,
                               "levels": []}
    try:
        wait_http(f"{double_url}/health", 30, procs[0])
        control = urllib.request.Request(
            f"{double_url}/_control", data=json.dumps({"token_delay": args.token_delay}).encode(),
            method="POST", headers={"Content-Type": "application/json"})
        urllib.request.urlopen(control, timeout=5).close()
        procs.append(start(python_module(
            "services.adapter", "--model", "qwen2", "--engine-url", double_url,
            "--port", str(adapter_port), "--max-concurrency", "100000",
            "--log-level", "warning")))
        procs.append(start(python_module(
            "services.router", "--port", str(router_port), "--max-in-flight", "100000",
            "--max-in-flight-total", str(args.router_bound),
            "--log-level", "warning"),
            env={"QWEN2_ADAPTERS": f"127.0.0.1:{adapter_port}",
                 "LLAMA3_ADAPTERS": f"127.0.0.1:{free_port()}"}))
        address = f"127.0.0.1:{router_port}"
        deadline = time.monotonic() + 60
        while health_status(address, "qwen2", timeout=0.5) != SERVING:
            if time.monotonic() > deadline:
                raise SystemExit("the router never served qwen2")
            time.sleep(0.2)
        if args.via_envoy:
            address = start_envoy(procs, router_port, args.router_bound)
            figures["via"] = "envoy"
        ends = time.monotonic() + args.budget
        base: float | None = None
        print(f"Relay: N streams of {args.tokens} tokens at {1 / args.token_delay:.0f} tokens/s "
              f"through {'Envoy, ' if args.via_envoy else ''}one router and one adapter "
              f"(router bound {args.router_bound})")
        print(f"{'streams':>8} {'TTFT p50 ms':>12} {'p90 ms':>8} {'tok/s p50':>10}  outcomes")
        for n in (int(x) for x in args.levels.split(",")):
            if time.monotonic() > ends:
                figures["stopped"] = f"time budget of {args.budget:.0f} s"
                break
            result = asyncio.run(level(address, n, args.tokens))
            figures["levels"].append(result)
            print(f"{n:>8} {result['ttft_p50_ms']!s:>12} {result['ttft_p90_ms']!s:>8} "
                  f"{result['tokens_per_s_p50']!s:>10}  {result['outcomes']}")
            p50 = result["ttft_p50_ms"]
            if base is None:
                base = p50
            elif (p50 is not None and base and p50 >= 2 * base
                  and "ttft_doubles_at_streams" not in figures):
                figures["ttft_doubles_at_streams"] = n
        if base is not None:
            figures["single_stream_ttft_ms"] = base
        said = figures.get("ttft_doubles_at_streams")
        last_ok = [x["streams"] for x in figures["levels"]
                   if base and x["ttft_p50_ms"] and x["ttft_p50_ms"] < 2 * base]
        figures["relayed_before_ttft_doubles"] = max(last_ok) if last_ok else None
        for line in sorted(DETAILS)[:5]:
            print(f"  error: {line}")
        figures["other_errors"] = sorted(DETAILS)[:5]
        print(f"TTFT doubles at {said} streams; relayed at most "
              f"{figures['relayed_before_ttft_doubles']} streams at single-stream pace")
    finally:
        for proc in reversed(procs):
            stop(proc)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
