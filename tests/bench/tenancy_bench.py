"""Tenants on a saturated model: priority, fair share and limits, with and
without the router's queue.

    python -m tests.bench.tenancy_bench [--seconds 20] [--quick] [--headroom 2]
        [--profile gpu|cpu] [--json out.json]

One model over a TGI double paced like a GPU: 8 sequences at a time, 20 ms
per token, the rest waiting first come first served in the engine (as TGI's
batch does); or, with `--profile cpu`, over the CPU backend (SmolLM2 through
llama.cpp, 8 sequences in its continuous batch). Real adapter and router
processes; the load is gRPC streams to the router.

- B alone: tenant B sends `interactive` requests (16 tokens) at a steady
  rate, one every 1/B_RATE seconds (2 requests/s: a fixed interval, not
  Poisson arrivals), each its own stream; its time to first token (TTFT) is
  the reference.
- flood: tenant A keeps 80 `batch` streams of 64 tokens open (10x the
  model's 8 slots) while B sends as before. Without the queue (the router
  of before: no tenants file) B waits behind A in the engine's queue; with
  it, B's requests go first, and the adaptive headroom (`--headroom`, the
  most slots held) keeps free from batch as many slots as B used lately.
- weights: two batch tenants with weights 1 and 3 keep 40 streams each
  open; their tokens served should be 1:3.
- limits: a tenant with a tokens_per_minute limit floods alone; the tokens
  it is served must stay within the limit.

Each scenario runs a 2 s warm-up, then its window; what is still running at
the end is cancelled. A first token that had not come by then counts as the
wait so far (a lower bound). Figures: B's TTFT p50/p95, A's tokens/s
against the model's (A alone, without the queue), the weighted share, and
tokens served over any limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from llmmesh.v1 import generate_pb2 as pb
from llmmesh.v1 import generate_pb2_grpc as pb_grpc

from tests.harness.parts import AdapterPart, DoublePart, Part, RouterPart, stop_all
from tests.harness.procs import free_port, python_module, wait_http
from tools.loadtest.stats import nearest_rank

SLOTS = 8
B_RATE = 2.0  # B's requests per second, each 16 tokens (about 0.35 s)
TOKEN_DELAY = 0.02
FLOOD = 80  # A's open streams: 10x the model's slots
LIMITED_TOKENS_PER_MINUTE = 1000
REPLY = " ".join(f"w{i}" for i in range(200))

TENANTS = f"""\
tenants:
  - name: a
    keys: [sk-a]
    priority: batch
  - name: b
    keys: [sk-b]
    priority: interactive
  - name: light
    keys: [sk-light]
    priority: batch
    weight: 1
  - name: heavy
    keys: [sk-heavy]
    priority: batch
    weight: 3
  - name: limited
    keys: [sk-limited]
    priority: batch
    limits: {{tokens_per_minute: {LIMITED_TOKENS_PER_MINUTE}}}
"""


# Seconds of each scenario before figures count (the engine's batch fills).
WARMUP = 2.0


class Tally:
    """Tokens received and first-token times inside the measuring window."""

    def __init__(self, window: tuple[float, float]) -> None:
        self.window = window
        self.tokens = 0
        self.ttft: list[float] = []
        self.errors: dict[str, int] = {}

    def counts(self, at: float) -> bool:
        return self.window[0] <= at < self.window[1]


async def one(stub: pb_grpc.GenerateServiceStub, key: str | None, tokens: int,
              tally: Tally) -> None:
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    request = pb.GenerateStreamRequest(
        model_id="qwen2", inputs="go", parameters=pb.GenerationParameters(max_new_tokens=tokens))
    began = time.monotonic()
    first = True
    seen = 0
    try:
        async for message in stub.GenerateStream(request, metadata=metadata, timeout=120):
            now = time.monotonic()
            if first and message.text:
                if tally.counts(began):
                    tally.ttft.append(now - began)
                first = False
            if tally.counts(now):
                tally.tokens += message.tokens - seen
            seen = message.tokens
    except grpc.aio.AioRpcError as exc:
        tally.errors[exc.code().name] = tally.errors.get(exc.code().name, 0) + 1
    except asyncio.CancelledError:
        # The window ended before the first token: counted as the wait so far
        # (a lower bound), so a starved caller shows in the percentiles.
        if first and tally.counts(began):
            tally.ttft.append(time.monotonic() - began)
        raise


async def keep_open(stub: pb_grpc.GenerateServiceStub, key: str | None, streams: int,
                    tokens: int, until: float, tally: Tally) -> None:
    async def loop() -> None:
        while time.monotonic() < until:
            await one(stub, key, tokens, tally)
            if tally.errors:  # refused (a limit): try again a little later
                await asyncio.sleep(0.2)

    await asyncio.gather(*(loop() for _ in range(streams)))


async def steady(stub: pb_grpc.GenerateServiceStub, key: str | None, rate: float,
                 tokens: int, until: float, tally: Tally) -> None:
    tasks = []
    try:
        while time.monotonic() < until:
            tasks.append(asyncio.create_task(one(stub, key, tokens, tally)))
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def ms(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"p50": float("nan"), "p95": float("nan"), "n": 0}
    s = sorted(samples)
    return {"p50": round(nearest_rank(s, 50) * 1000, 1),
            "p95": round(nearest_rank(s, 95) * 1000, 1), "n": len(s)}


async def scenario(address: str, seconds: float, *, flood: bool, interactive: bool,
                   weights: bool = False, limited: bool = False,
                   keys: bool = True) -> dict[str, Any]:
    start = time.monotonic()
    until = start + WARMUP + seconds
    window = (start + WARMUP, until)
    a, b, light, heavy, lim = (Tally(window) for _ in range(5))

    def key(name: str) -> str | None:
        return f"sk-{name}" if keys else None

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerateServiceStub(channel)
        jobs = []
        if flood:
            jobs.append(keep_open(stub, key("a"), FLOOD, 64, until, a))
        if interactive:
            jobs.append(steady(stub, key("b"), B_RATE, 16, until, b))
        if weights:
            jobs.append(keep_open(stub, key("light"), 40, 64, until, light))
            jobs.append(keep_open(stub, key("heavy"), 40, 64, until, heavy))
        if limited:
            jobs.append(keep_open(stub, key("limited"), 16, 64, until, lim))
        tasks = [asyncio.create_task(job) for job in jobs]
        await asyncio.sleep(until - time.monotonic())
        # The window is over: what is still running or waiting goes away.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    took = seconds
    out: dict[str, Any] = {"seconds": seconds}
    if flood:
        out["a_tokens_per_s"] = round(a.tokens / took, 1)
        out["a_errors"] = a.errors
    if interactive:
        out["b_ttft_ms"] = ms(b.ttft)
        out["b_errors"] = b.errors
    if weights:
        out["light_tokens"], out["heavy_tokens"] = light.tokens, heavy.tokens
        out["heavy_to_light"] = round(heavy.tokens / max(1, light.tokens), 2)
    if limited:
        out["limited_tokens"] = lim.tokens
        out["limited_over_limit"] = max(0, lim.tokens - LIMITED_TOKENS_PER_MINUTE)
        out["limited_refused"] = lim.errors
    return out


class CpuBackendPart(DoublePart):
    """The CPU backend (TGI's HTTP API over llama.cpp) where a double would be."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        Part.__init__(
            self, "cpu-backend",
            python_module("services.cpu_backend", "--port", str(self.port),
                          "--served-model-id", "qwen2", "--max-batch-size", str(SLOTS),
                          "--max-concurrent-requests", "1024", "--threads", "2"),
            tmp / "cpu-backend.log",
            lambda part: wait_http(f"{self.url}/health", 0.5),
        )


@contextmanager
def mesh(tmp: Path, *router_flags: str, profile: str = "gpu") -> Iterator[str]:
    double = (CpuBackendPart(tmp) if profile == "cpu" else DoublePart(
        "qwen2", tmp, "--batch-slots", str(SLOTS), "--token-delay", str(TOKEN_DELAY),
        "--reply", REPLY, "--max-concurrent-requests", "1024"))
    parts: list[Part] = [double]
    try:
        double.start(timeout=120)
        adapter = AdapterPart("adapter", tmp, "qwen2", double, "--max-concurrency", "1024")
        adapter.start()
        parts.append(adapter)
        router = RouterPart(tmp, {"qwen2": [adapter.address]}, "--max-in-flight", "1024",
                            *router_flags)
        router.start()
        parts.append(router)
        yield router.address
    finally:
        stop_all(parts[::-1])


def run(seconds: float, headroom: int = 2, profile: str = "gpu",
        memory: float = 3.0) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tenants = tmp / "tenants.yaml"
        tenants.write_text(TENANTS)
        (tmp / "off").mkdir()
        with mesh(tmp / "off", profile=profile) as address:
            off = results.setdefault("without_queue", {})
            off["b_alone"] = asyncio.run(scenario(address, seconds, flood=False,
                                                  interactive=True, keys=False))
            off["a_alone"] = asyncio.run(scenario(address, seconds, flood=True,
                                                  interactive=False, keys=False))
            off["flood"] = asyncio.run(scenario(address, seconds, flood=True,
                                                interactive=True, keys=False))
            print("without the queue:", json.dumps(off), flush=True)
        (tmp / "on").mkdir()
        with mesh(tmp / "on", "--tenants-file", str(tenants), "--headroom", str(headroom),
                  "--headroom-memory", str(memory),
                  "--slots-per-replica", str(SLOTS), profile=profile) as address:
            on = results.setdefault("with_queue", {})
            on["b_alone"] = asyncio.run(scenario(address, seconds, flood=False, interactive=True))
            on["a_alone"] = asyncio.run(scenario(address, seconds, flood=True, interactive=False))
            on["flood"] = asyncio.run(scenario(address, seconds, flood=True, interactive=True))
            on["limits"] = asyncio.run(scenario(address, seconds, flood=False,
                                                interactive=False, limited=True))
            on["weights"] = asyncio.run(scenario(address, seconds, flood=False,
                                                 interactive=False, weights=True))
            print("with the queue:", json.dumps(on), flush=True)
    model = results["without_queue"]["a_alone"]["a_tokens_per_s"]
    on, off = results["with_queue"], results["without_queue"]
    results["summary"] = {
        "model_tokens_per_s": model,
        "b_ttft_p95_alone_ms": on["b_alone"]["b_ttft_ms"]["p95"],
        "b_ttft_p95_flood_with_queue_ms": on["flood"]["b_ttft_ms"]["p95"],
        "b_ttft_p95_flood_without_queue_ms": off["flood"]["b_ttft_ms"]["p95"],
        "b_ttft_ratio_with_queue": round(
            on["flood"]["b_ttft_ms"]["p95"] / on["b_alone"]["b_ttft_ms"]["p95"], 2),
        "b_ttft_ratio_without_queue": round(
            off["flood"]["b_ttft_ms"]["p95"] / off["b_alone"]["b_ttft_ms"]["p95"], 2),
        "a_share_with_queue": round(on["flood"]["a_tokens_per_s"] / model, 3),
        "a_share_without_queue": round(off["flood"]["a_tokens_per_s"] / model, 3),
        "heavy_to_light": on["weights"]["heavy_to_light"],
        "limited_tokens": on["limits"]["limited_tokens"],
        "tokens_over_limit": on["limits"]["limited_over_limit"],
    }
    return results


def main() -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m tests.bench.tenancy_bench", description=__doc__)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--quick", action="store_true", help="5 s per scenario")
    p.add_argument("--headroom", type=int, default=2,
                   help="the router's --headroom: the most slots batch requests may not "
                        "take (only as many as interactive requests used lately are held)")
    p.add_argument("--headroom-memory", type=float, default=3.0,
                   help="the router's --headroom-memory: seconds the held slots follow "
                        "interactive use")
    p.add_argument("--profile", choices=("gpu", "cpu"), default="gpu",
                   help="gpu: TGI doubles paced like a GPU; cpu: the CPU backend")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    results = run(5.0 if args.quick else args.seconds, args.headroom, args.profile,
                  args.headroom_memory)
    results["path_cost"] = path_cost()
    s = results["summary"]
    engine = "the CPU backend" if args.profile == "cpu" else "8 slots, 20 ms/token"
    print(f"\nTenants on a saturated model ({engine}; A floods with 80 batch "
          f"streams, B sends interactive requests at {B_RATE:g}/s)")
    print(f"| | without the queue | with the queue (headroom up to {args.headroom}, "
          f"memory {args.headroom_memory:g} s) |")
    print("|---|---|---|")
    print(f"| B's TTFT p95, alone | {results['without_queue']['b_alone']['b_ttft_ms']['p95']} ms "
          f"| {s['b_ttft_p95_alone_ms']} ms |")
    print(f"| B's TTFT p95, during A's flood | {s['b_ttft_p95_flood_without_queue_ms']} ms "
          f"({s['b_ttft_ratio_without_queue']}x) | {s['b_ttft_p95_flood_with_queue_ms']} ms "
          f"({s['b_ttft_ratio_with_queue']}x) |")
    print(f"| A's share of the model's {s['model_tokens_per_s']} tokens/s | "
          f"{s['a_share_without_queue']:.1%} | {s['a_share_with_queue']:.1%} |")
    print(f"| weights 3:1, tokens served | - | {s['heavy_to_light']}:1 |")
    print(f"| tokens over a limit ({LIMITED_TOKENS_PER_MINUTE}/min; "
          f"{s['limited_tokens']} served) | - | {s['tokens_over_limit']} |")
    cost = results["path_cost"]
    print(f"CPU per request of the tenancy path: off {cost['off_ms']} ms, "
          f"on {cost['on_ms']} ms (key, priority, estimate, reserve, slot, settle)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def path_cost(n: int = 20000) -> dict[str, float]:
    """CPU ms per request of the router's tenancy path, in process: off (no
    tenants: the checks that skip it) and on (resolve the caller from its key
    and priority header, estimate, reserve in the router's memory, take and
    give back a queue slot, record, settle)."""
    import dataclasses

    from services.common.request_context import RequestContext
    from services.common.types import GenerationRequest, Parameters
    from services.router.core import input_estimate
    from services.tenancy.caller import Callers
    from services.tenancy.settings import TenancySettings, make_gate
    from services.tenancy.tenants import parse_tenants

    tenants = parse_tenants(TENANTS.replace("priority: interactive",
                                            "priority: interactive\n    limits: "
                                            "{tokens_per_minute: 1000000000, "
                                            "requests_per_minute: 1000000000}"))
    callers = Callers(lambda: tenants)
    metadata = (("authorization", "Bearer sk-b"), ("x-llmmesh-priority", "interactive"))
    request = GenerationRequest("qwen2", inputs="a question " * 20,
                                parameters=Parameters(max_new_tokens=64))
    context = RequestContext(None, "qwen2", "chat")

    async def on() -> float:
        gate = make_gate(TenancySettings(), {"qwen2": 8})
        began = time.process_time()
        for _ in range(n):
            caller = callers.resolve(metadata)
            ctx = dataclasses.replace(context, caller=caller, tenant=caller.tenant.name)
            tokens = input_estimate(request) + 64
            assert ctx.caller is not None
            async with gate.admit(ctx.caller.tenant, "qwen2", ctx.caller.priority,
                                  tokens=tokens) as admission:
                admission.record(40, 64)
            await asyncio.sleep(0)  # the settle task runs
        await gate.drain()
        took = time.process_time() - began
        await gate.close()
        return took

    async def off() -> float:
        gate = None
        callers_off = None
        began = time.process_time()
        for _ in range(n):
            if callers_off is not None:
                raise AssertionError
            if gate is not None:
                raise AssertionError
            await asyncio.sleep(0)
        return time.process_time() - began

    async def empty() -> float:
        began = time.process_time()
        for _ in range(n):
            await asyncio.sleep(0)
        return time.process_time() - began

    base = asyncio.run(empty())
    return {
        "off_ms": round(max(0.0, asyncio.run(off()) - base) / n * 1000, 4),
        "on_ms": round(max(0.0, asyncio.run(on()) - base) / n * 1000, 4),
    }


if __name__ == "__main__":
    main()
