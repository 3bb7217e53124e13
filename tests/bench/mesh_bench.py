"""What the mesh costs, hop by hop, against a zero-delay TGI double.

    python -m tests.bench.mesh_bench [--runs 3] [--quick] [--json out.json]

Starts two TGI doubles and the mesh (launcher: adapters, router, Envoy) on
free loopback ports, then measures:
- unary latency at concurrency 1: the backend directly, one adapter over
  gRPC, router -> adapter over gRPC, Envoy -> router -> adapter over HTTP;
- throughput at concurrency 32 and 128 through Envoy (HTTP) and the router
  (gRPC), with errors and CPU seconds per request of every process;
- streaming: time to first token per hop, tokens/s of one long stream, and
  1,000 slow streams held open at once, with errors and memory.
Every figure is the median of --runs runs. Load is bounded in requests and
time; everything stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from llmmesh.v1 import generate_pb2 as pb
from llmmesh.v1 import generate_pb2_grpc as pb_grpc

from tests.integration.conftest import Mesh, start_doubles, start_mesh, stop_mesh
from tests.procs import stop

PROMPT = "one two three four five six seven eight"  # the double echoes it: 8 tokens
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- measuring -------------------------------------------------------------------------


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99)}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_mb(pid: int) -> float:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * PAGE / 1e6


def processes(mesh: Mesh) -> dict[str, int]:
    """pid of every process of the mesh, by name (from the launcher's children)."""
    out = {f"double-{m}": d.proc.pid for m, d in mesh.doubles.items()}
    children = Path(f"/proc/{mesh.launcher.pid}/task/{mesh.launcher.pid}/children")
    for pid in map(int, children.read_text().split()):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        text = " ".join(c.decode() for c in cmd)
        if "services.router" in text:
            out["router"] = pid
        elif "services.adapter" in text:
            out[f"adapter-{cmd[cmd.index(b'--model') + 1].decode()}"] = pid
        elif "envoy" in cmd[0].decode():
            out["envoy"] = pid
    return out


@dataclass
class Load:
    seconds: float
    requests: int
    errors: int
    cpu: dict[str, float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


async def run_load(
    call: Callable[[], Awaitable[bool]], total: int, concurrency: int, pids: dict[str, int]
) -> Load:
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
    cpu = {name: (cpu_seconds(pid) - before[name]) / total * 1000 for name, pid in pids.items()}
    return Load(elapsed, total, errors, cpu)


# -- the clients -----------------------------------------------------------------------


class Clients:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=60)
        )
        self.router = grpc.aio.insecure_channel(mesh.router)
        self.adapter = grpc.aio.insecure_channel(mesh.adapters["qwen2"])
        self.router_stub = pb_grpc.GenerateServiceStub(self.router)
        self.adapter_stub = pb_grpc.GenerateServiceStub(self.adapter)
        self.body = json.dumps({"model_id": "qwen2", "inputs": PROMPT,
                                "parameters": {"max_new_tokens": 16}}).encode()
        self.backend_body = json.dumps({"inputs": f"<|im_start|>user\n{PROMPT}<|im_end|>\n",
                                        "parameters": {"max_new_tokens": 16}}).encode()
        self.request = pb.GenerateRequest(
            model_id="qwen2", inputs=PROMPT,
            parameters=pb.GenerationParameters(max_new_tokens=16))

    async def close(self) -> None:
        await self.http.close()
        await self.router.close()
        await self.adapter.close()

    async def backend(self) -> bool:
        async with self.http.post(f"{self.mesh.doubles['qwen2'].url}/generate",
                                  data=self.backend_body,
                                  headers={"Content-Type": "application/json"}) as resp:
            await resp.read()
            return resp.status == 200

    async def adapter_grpc(self) -> bool:
        reply = await self.adapter_stub.Generate(self.request, timeout=30)
        return reply.tokens > 0

    async def router_grpc(self) -> bool:
        reply = await self.router_stub.Generate(self.request, timeout=30)
        return reply.tokens > 0

    async def envoy_http(self) -> bool:
        async with self.http.post(f"{self.mesh.http}/v1/generate", data=self.body,
                                  headers={"Content-Type": "application/json"}) as resp:
            await resp.read()
            return resp.status == 200


async def latency(call: Callable[[], Awaitable[bool]], n: int) -> dict[str, float]:
    for _ in range(20):  # warm connections and caches
        await call()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        ok = await call()
        samples.append(time.perf_counter() - started)
        if not ok:
            raise RuntimeError("a latency request failed")
    return percentiles(samples)


async def stream_ttft_and_rate(
    clients: Clients, url: str, body: dict[str, Any], tokens: int
) -> tuple[float, float]:
    """(ms to the first event, tokens/s over the whole stream) for one SSE stream."""
    started = time.perf_counter()
    first = None
    count = 0
    async with clients.http.post(url, json=body) as resp:
        async for line in resp.content:
            if line.startswith(b"data:"):
                if first is None:
                    first = time.perf_counter()
                count += 1
    elapsed = time.perf_counter() - started
    assert first is not None
    return (first - started) * 1000, tokens / elapsed


async def hold_streams(clients: Clients, n: int, pids: dict[str, int]) -> dict[str, Any]:
    """n slow streams open at once through Envoy; errors and memory at the peak."""
    double = clients.mesh.doubles["llama3"]
    double.control(token_delay=0.5)
    body = {"model_id": "llama3", "inputs": "a b c d e f", "parameters": {"max_new_tokens": 6}}
    rss_before = {name: rss_mb(pid) for name, pid in pids.items()}
    peak: dict[str, float] = {}
    errors = 0
    connector = aiohttp.TCPConnector(limit=n + 16)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            nonlocal errors
            try:
                async with session.post(f"{clients.mesh.http}/v1/generate_stream", json=body,
                                        timeout=aiohttp.ClientTimeout(total=60)) as resp:
                    last = b""
                    async for line in resp.content:
                        if line.startswith(b"data:"):
                            last = line
                    if resp.status != 200 or b"FINISH_REASON_LENGTH" not in last:
                        errors += 1
            except Exception:
                errors += 1

        async def sample() -> None:
            while True:
                for name, pid in pids.items():
                    peak[name] = max(peak.get(name, 0.0), rss_mb(pid))
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        elapsed = time.perf_counter() - started
        sampler.cancel()
    double.reset()
    return {
        "streams": n, "errors": errors, "seconds": round(elapsed, 2),
        "rss_mb_before": {k: round(v, 1) for k, v in rss_before.items()},
        "rss_mb_peak": {k: round(v, 1) for k, v in peak.items()},
    }


# -- the run ---------------------------------------------------------------------------


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


async def measure(mesh: Mesh, args: argparse.Namespace) -> dict[str, Any]:
    clients = Clients(mesh)
    pids = processes(mesh)
    results: dict[str, Any] = {}
    try:
        hops = {
            "backend (HTTP, direct)": clients.backend,
            "adapter (gRPC)": clients.adapter_grpc,
            "router -> adapter (gRPC)": clients.router_grpc,
            "Envoy -> router -> adapter (HTTP/JSON)": clients.envoy_http,
        }
        lat: dict[str, list[dict[str, float]]] = {name: [] for name in hops}
        for _ in range(args.runs):
            for name, call in hops.items():
                lat[name].append(await latency(call, args.latency_requests))
        results["latency_ms"] = {name: median_of(runs) for name, runs in lat.items()}

        throughput: dict[str, Any] = {}
        for concurrency in (32, 128):
            for name, call in (("Envoy (HTTP)", clients.envoy_http),
                               ("router (gRPC)", clients.router_grpc)):
                loads = [await run_load(call, args.load_requests, concurrency, pids)
                         for _ in range(args.runs)]
                best = sorted(loads, key=lambda x: x.rps)[len(loads) // 2]
                throughput[f"{name} c={concurrency}"] = {
                    "rps": round(best.rps, 1),
                    "errors": sum(x.errors for x in loads),
                    "requests": sum(x.requests for x in loads),
                    "cpu_ms_per_request": {k: round(v, 3) for k, v in best.cpu.items()},
                }
        results["throughput"] = throughput

        long_tokens = args.stream_tokens
        reply = " ".join(f"w{i}" for i in range(long_tokens))
        for double in mesh.doubles.values():
            double.control(reply=reply)
        direct, mesh_stream = [], []
        for _ in range(args.runs):
            direct.append(await stream_ttft_and_rate(
                clients, f"{mesh.doubles['qwen2'].url}/generate_stream",
                {"inputs": "x", "parameters": {"max_new_tokens": long_tokens}}, long_tokens))
            mesh_stream.append(await stream_ttft_and_rate(
                clients, f"{mesh.http}/v1/generate_stream",
                {"model_id": "qwen2", "inputs": "x",
                 "parameters": {"max_new_tokens": long_tokens}}, long_tokens))
        for double in mesh.doubles.values():
            double.reset()
        results["stream"] = {
            "tokens": long_tokens,
            "backend_ttft_ms": round(statistics.median(x[0] for x in direct), 2),
            "mesh_ttft_ms": round(statistics.median(x[0] for x in mesh_stream), 2),
            "backend_tokens_per_s": round(statistics.median(x[1] for x in direct)),
            "mesh_tokens_per_s": round(statistics.median(x[1] for x in mesh_stream)),
        }
        results["held_streams"] = await hold_streams(clients, args.held_streams, pids)
    finally:
        await clients.close()
    return results


def report(results: dict[str, Any]) -> str:
    lat = results["latency_ms"]
    base = lat["backend (HTTP, direct)"]
    lines = ["## Unary latency, concurrency 1 (ms; added over the direct backend)", "",
             "| path | p50 | p95 | p99 | +p50 | +p99 |", "|---|---|---|---|---|---|"]
    for name, row in lat.items():
        lines.append(f"| {name} | {row['p50']:.2f} | {row['p95']:.2f} | {row['p99']:.2f} | "
                     f"{row['p50'] - base['p50']:+.2f} | {row['p99'] - base['p99']:+.2f} |")
    lines += ["", "## Throughput (zero-delay backend, 16 tokens a reply)", "",
              "| path | req/s | errors | CPU ms per request by process |", "|---|---|---|---|"]
    for name, row in results["throughput"].items():
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in row["cpu_ms_per_request"].items())
        lines.append(f"| {name} | {row['rps']:.0f} | {row['errors']}/{row['requests']} | {cpu} |")
    s = results["stream"]
    lines += ["", "## Streaming", "",
              f"- time to first token: backend {s['backend_ttft_ms']} ms, "
              f"through Envoy {s['mesh_ttft_ms']} ms "
              f"(+{s['mesh_ttft_ms'] - s['backend_ttft_ms']:.2f} ms)",
              f"- one {s['tokens']}-token stream: backend {s['backend_tokens_per_s']} tokens/s, "
              f"through the mesh {s['mesh_tokens_per_s']} tokens/s"]
    h = results["held_streams"]
    lines.append(f"- {h['streams']} slow streams held at once: {h['errors']} errors in "
                 f"{h['seconds']} s; peak RSS MB {h['rss_mb_peak']}")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import grpc as grpc_module

    return {
        "cores": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "grpcio": grpc_module.__version__,
        "aiohttp": aiohttp.__version__, "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--latency-requests", type=int, default=300)
    p.add_argument("--load-requests", type=int, default=3000)
    p.add_argument("--stream-tokens", type=int, default=2000)
    p.add_argument("--held-streams", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.runs, args.latency_requests, args.load_requests = 1, 50, 300
        args.stream_tokens, args.held_streams = 200, 50
    with tempfile.TemporaryDirectory(prefix="llmmesh-bench-") as tmp:
        # Limits above the held streams, so the bench measures the mesh, not its limits.
        limit = str(max(2048, args.held_streams * 2))
        doubles = start_doubles(Path(tmp), log_level="WARNING", max_concurrent_requests=limit)
        try:
            mesh = start_mesh(Path(tmp), doubles, "--max-concurrent-requests", limit)
            try:
                results = asyncio.run(measure(mesh, args))
            finally:
                stop_mesh(mesh)
        finally:
            for double in doubles.values():
                stop(double.proc)
    results["machine"] = machine()
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nfigures: {args.json}")


if __name__ == "__main__":
    main()
