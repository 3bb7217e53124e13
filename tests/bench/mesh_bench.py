"""What the mesh costs, hop by hop, against a lean zero-delay TGI double.

    python -m tests.bench.mesh_bench [--runs 3] [--quick] [--json out.json]

Starts two lean TGI doubles (tools/lean_tgi_double.py: a raw asyncio server
with TGI's shapes that spends next to no CPU) and the mesh (launcher:
adapters, router, Envoy) on free loopback ports, then measures:
- unary latency at concurrency 1, from a lean keep-alive client (blocking
  http.client, a sync gRPC stub): the backend directly, one adapter over
  gRPC, router -> adapter over gRPC, and every HTTP path through Envoy;
- throughput at concurrency 32 and 128 through Envoy, load from wrk (C,
  Debian package) with a Lua script that posts the body and checks every
  reply: successes per second, failures, and the CPU milliseconds each
  process of the mesh spent per successful request (from /proc);
- streaming: time to first token per hop, tokens/s of one long stream
  (the tokens counted from what arrived), and 1,000 slow streams held open
  at once, with errors and memory.

HTTP paths are entries of PATHS; a path is measured when the mesh answers it
(the OpenAI-compatible `/v1/chat/completions` on Envoy's port, for one).
Latency and throughput figures are medians of --runs runs (the JSON says
how many). Load is bounded in time; everything stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from llmmesh.v1 import generate_pb2 as pb
from llmmesh.v1 import generate_pb2_grpc as pb_grpc

from tests.harness.mesh import MODELS, Double, Mesh, start_mesh, stop_mesh
from tests.harness.procs import free_port, python_module, start, stop, wait_http
from tools.loadtest.stats import nearest_rank

TOKENS = 16  # new tokens per reply; the lean double answers exactly this many
PROMPT = "one two three four five six seven eight"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- the paths -------------------------------------------------------------------------


@dataclass(frozen=True)
class HTTPPath:
    """One HTTP/JSON route through Envoy, and what a complete success looks like."""

    name: str
    path: str
    body: dict[str, Any]
    # (key, JSON value) pairs that a 200 reply must hold: finish reason, token count.
    # Matched as `"key": value` with any spacing, so any JSON encoder passes.
    fields: tuple[tuple[str, str], ...]

    def ok(self, status: int, body: bytes) -> bool:
        return status == 200 and all(
            re.search(rf'"{k}"\s*:\s*{re.escape(v)}(?![0-9])'.encode(), body)
            for k, v in self.fields)

    def lua_patterns(self) -> str:
        """The same checks as Lua patterns, for wrk's script."""
        def lua(text: str) -> str:
            return re.sub(r"([^\w\s])", r"%\1", text)
        return ", ".join(
            f'[==["{lua(k)}"%s*:%s*{lua(v)}{"%f[^%d]" if v.isdigit() else ""}]==]'
            for k, v in self.fields)


PATHS = (
    HTTPPath(
        "native /v1/generate", "/v1/generate",
        {"model_id": "qwen2", "inputs": PROMPT, "parameters": {"max_new_tokens": TOKENS}},
        (("finish_reason", '"FINISH_REASON_LENGTH"'), ("tokens", str(TOKENS))),
    ),
    HTTPPath(
        "OpenAI /v1/chat/completions", "/v1/chat/completions",
        {"model": "qwen2", "messages": [{"role": "user", "content": PROMPT}],
         "max_tokens": TOKENS},
        (("finish_reason", '"length"'), ("completion_tokens", str(TOKENS))),
    ),
)
# The backend itself, for reference: what the hops are added to.
BACKEND = HTTPPath(
    "backend directly (TGI HTTP)", "/generate",
    {"inputs": f"<|im_start|>user\n{PROMPT}<|im_end|>\n",
     "parameters": {"max_new_tokens": TOKENS, "details": True}},
    (("finish_reason", '"length"'), ("generated_tokens", str(TOKENS))),
)


# -- measuring -------------------------------------------------------------------------


def percentiles_ms(samples: list[float]) -> dict[str, float]:
    return {f"p{q}": nearest_rank(samples, q) * 1000 for q in (50, 95, 99)}


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


class KeepAlive:
    """A lean blocking HTTP/1.1 client on one kept-alive connection."""

    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.conn.request("POST", path, body, {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        return resp.status, resp.read()

    def close(self) -> None:
        self.conn.close()


def latency(call: Callable[[], bool], n: int) -> dict[str, float]:
    for _ in range(20):  # warm connections and caches
        call()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        ok = call()
        samples.append(time.perf_counter() - started)
        if not ok:
            raise RuntimeError("a latency request failed")
    return percentiles_ms(samples)


def http_call(client: KeepAlive, path: HTTPPath) -> Callable[[], bool]:
    body = json.dumps(path.body).encode()
    return lambda: path.ok(*client.post(path.path, body))


def grpc_call(stub: pb_grpc.GenerateServiceStub) -> Callable[[], bool]:
    request = pb.GenerateRequest(model_id="qwen2", inputs=PROMPT,
                                 parameters=pb.GenerationParameters(max_new_tokens=TOKENS))

    def call() -> bool:
        reply = stub.Generate(request, timeout=30)
        return reply.tokens == TOKENS and reply.finish_reason == pb.FINISH_REASON_LENGTH

    return call


# -- wrk -------------------------------------------------------------------------------

LUA = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
good, bad = 0, 0
local patterns = {{ {patterns} }}
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function response(status, headers, body)
  local ok = status == 200
  for _, p in ipairs(patterns) do
    if ok and not string.find(body, p) then ok = false end
  end
  if ok then good = good + 1 else bad = bad + 1 end
end
function done(summary, latency, requests)
  local g, b = 0, 0
  for _, t in ipairs(threads) do g = g + t:get("good"); b = b + t:get("bad") end
  local e = summary.errors
  io.write(string.format("WRK_RESULT %d %d %d %d %d\\n", g, b, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


@dataclass
class Load:
    successes: int
    failures: int  # replies that were not a complete success, and socket errors
    seconds: float
    cpu_ms: dict[str, float]  # per successful request, by process (wrk's own too)

    @property
    def rps(self) -> float:
        return self.successes / self.seconds


def wrk(url: str, path: HTTPPath, concurrency: int, seconds: float, pids: dict[str, int],
        script_dir: Path) -> Load:
    script = script_dir / f"{abs(hash((path.path, json.dumps(path.body))))}.lua"
    script.write_text(LUA.format(body=json.dumps(path.body), patterns=path.lua_patterns()))
    threads = min(2, concurrency)
    cmd = ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{seconds:g}s",
           "--timeout", "10s", "-s", str(script), f"{url}{path.path}"]
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    # Reaped here rather than by Popen, for wrk's own CPU time.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    spent = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    spent["wrk"] = usage.ru_utime + usage.ru_stime
    text = out.decode(errors="replace")
    line = next((x for x in text.splitlines() if x.startswith("WRK_RESULT")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed: {text}")
    good, bad, micros, socket_errors, _ = map(int, line.split()[1:])
    cpu = {name: spent_s / max(1, good) * 1000 for name, spent_s in spent.items()}
    return Load(good, bad + socket_errors, micros / 1e6, cpu)


# -- streams ---------------------------------------------------------------------------


async def mesh_stream(session: aiohttp.ClientSession, url: str, tokens: int) -> tuple[float, float]:
    """(ms to the first token, tokens/s) of one stream through Envoy, counting what arrived."""
    body = {"model_id": "qwen2", "inputs": "x", "parameters": {"max_new_tokens": tokens}}
    started = time.perf_counter()
    first = None
    last: dict[str, Any] = {}
    async with session.post(f"{url}/v1/generate_stream", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"stream answered {resp.status}")
        async for line in resp.content:
            if line.startswith(b"data:"):
                event = json.loads(line[5:])
                if first is None and event.get("tokens"):
                    first = time.perf_counter()
                last = event
    elapsed = time.perf_counter() - started
    if last.get("error") or last.get("finish_reason") != "FINISH_REASON_LENGTH":
        raise RuntimeError(f"the stream did not end well: {last}")
    if first is None:
        raise RuntimeError("no token arrived")
    return (first - started) * 1000, int(last["tokens"]) / elapsed


async def backend_stream(session: aiohttp.ClientSession, url: str, tokens: int
                         ) -> tuple[float, float]:
    """The same from the double directly, in TGI's stream shape."""
    body = {"inputs": "x", "parameters": {"max_new_tokens": tokens}}
    started = time.perf_counter()
    first = None
    count = 0
    final: dict[str, Any] = {}
    async with session.post(f"{url}/generate_stream", json=body) as resp:
        async for line in resp.content:
            if line.startswith(b"data:"):
                event = json.loads(line[5:])
                if first is None:
                    first = time.perf_counter()
                count += 1
                if event.get("details"):
                    final = event["details"]
    elapsed = time.perf_counter() - started
    if final.get("finish_reason") != "length" or first is None:
        raise RuntimeError(f"the backend's stream did not end well: {final}")
    return (first - started) * 1000, count / elapsed


async def hold_streams(mesh: Mesh, n: int, pids: dict[str, int]) -> dict[str, Any]:
    """n slow streams open at once through Envoy; errors and memory at the peak."""
    double = mesh.doubles["llama3"]
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
                async with session.post(f"{mesh.http}/v1/generate_stream", json=body,
                                        timeout=aiohttp.ClientTimeout(total=120)) as resp:
                    last: dict[str, Any] = {}
                    async for line in resp.content:
                        if line.startswith(b"data:"):
                            last = json.loads(line[5:])
                    if (resp.status != 200 or last.get("error") or last.get("tokens") != 6
                            or last.get("finish_reason") != "FINISH_REASON_LENGTH"):
                        errors += 1
            except (aiohttp.ClientError, TimeoutError, ValueError):
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


def served_paths(mesh: Mesh) -> tuple[list[HTTPPath], dict[str, str]]:
    """The PATHS the mesh answers with a complete success; why the others are left out."""
    client = KeepAlive(mesh.http)
    served, skipped = [], {}
    try:
        for path in PATHS:
            status, body = client.post(path.path, json.dumps(path.body).encode())
            if path.ok(status, body):
                served.append(path)
            else:
                skipped[path.name] = f"not served here ({status}: {body[:80]!r})"
    finally:
        client.close()
    return served, skipped


def measure(mesh: Mesh, args: argparse.Namespace, script_dir: Path) -> dict[str, Any]:
    pids = processes(mesh)
    paths, skipped = served_paths(mesh)
    results: dict[str, Any] = {"runs": args.runs, "paths_left_out": skipped}

    backend = KeepAlive(mesh.doubles["qwen2"].url)
    envoy = KeepAlive(mesh.http)
    adapter_channel = grpc.insecure_channel(mesh.adapters["qwen2"])
    router_channel = grpc.insecure_channel(mesh.router)
    hops: dict[str, Callable[[], bool]] = {
        BACKEND.name: http_call(backend, BACKEND),
        "adapter (gRPC)": grpc_call(pb_grpc.GenerateServiceStub(adapter_channel)),
        "router -> adapter (gRPC)": grpc_call(pb_grpc.GenerateServiceStub(router_channel)),
    }
    for path in paths:
        hops[f"Envoy -> router -> adapter, {path.name}"] = http_call(envoy, path)
    try:
        lat: dict[str, list[dict[str, float]]] = {name: [] for name in hops}
        for _ in range(args.runs):
            for name, call in hops.items():
                lat[name].append(latency(call, args.latency_requests))
        results["latency_ms"] = {name: median_of(runs) for name, runs in lat.items()}
    finally:
        for closable in (backend, envoy, adapter_channel, router_channel):
            closable.close()

    throughput: dict[str, Any] = {}
    targets = [(mesh.doubles["qwen2"].url, BACKEND)] + [(mesh.http, p) for p in paths]
    for concurrency in (32, 128):
        for url, path in targets:
            wrk(url, path, concurrency, 1, pids, script_dir)  # warm-up
            loads = [wrk(url, path, concurrency, args.seconds, pids, script_dir)
                     for _ in range(args.runs)]
            mid = sorted(loads, key=lambda x: x.rps)[len(loads) // 2]
            throughput[f"{path.name}, c={concurrency}"] = {
                "successes_per_s": round(mid.rps, 1),
                "failures": sum(x.failures for x in loads),
                "successes": sum(x.successes for x in loads),
                "cpu_ms_per_request": {k: round(v, 3) for k, v in mid.cpu_ms.items()},
            }
    results["throughput"] = throughput

    async def streams() -> None:
        tokens = args.stream_tokens
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            direct, meshed = [], []
            for _ in range(args.runs):
                direct.append(await backend_stream(session, mesh.doubles["qwen2"].url, tokens))
                meshed.append(await mesh_stream(session, mesh.http, tokens))
        results["stream"] = {
            "tokens": tokens,
            "backend_ttft_ms": round(statistics.median(x[0] for x in direct), 2),
            "mesh_ttft_ms": round(statistics.median(x[0] for x in meshed), 2),
            "backend_tokens_per_s": round(statistics.median(x[1] for x in direct)),
            "mesh_tokens_per_s": round(statistics.median(x[1] for x in meshed)),
        }
        results["held_streams"] = await hold_streams(mesh, args.held_streams, pids)

    asyncio.run(streams())
    return results


def report(results: dict[str, Any]) -> str:
    runs = results["runs"]
    over = f"medians of {runs} runs" if runs > 1 else "one run"
    lat = results["latency_ms"]
    base = lat[BACKEND.name]
    lines = [f"## Unary latency, concurrency 1 (ms; added over the backend; {over})", "",
             "| path | p50 | p95 | p99 | +p50 | +p99 |", "|---|---|---|---|---|---|"]
    for name, row in lat.items():
        lines.append(f"| {name} | {row['p50']:.2f} | {row['p95']:.2f} | {row['p99']:.2f} | "
                     f"{row['p50'] - base['p50']:+.2f} | {row['p99'] - base['p99']:+.2f} |")
    lines += ["", f"## Throughput from wrk ({TOKENS}-token replies; {over})", "",
              "| path | successes/s | failures | CPU ms per request by process |",
              "|---|---|---|---|"]
    for name, row in results["throughput"].items():
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in row["cpu_ms_per_request"].items())
        lines.append(f"| {name} | {row['successes_per_s']:.0f} | "
                     f"{row['failures']}/{row['successes'] + row['failures']} | {cpu} |")
    for name, why in results["paths_left_out"].items():
        lines.append(f"\n{name}: {why}")
    s = results["stream"]
    lines += ["", "## Streaming", "",
              f"- time to first token: backend {s['backend_ttft_ms']} ms, "
              f"through Envoy {s['mesh_ttft_ms']} ms "
              f"(+{s['mesh_ttft_ms'] - s['backend_ttft_ms']:.2f} ms)",
              f"- one {s['tokens']}-token stream, tokens counted as they arrived: backend "
              f"{s['backend_tokens_per_s']} tokens/s, through the mesh "
              f"{s['mesh_tokens_per_s']} tokens/s"]
    h = results["held_streams"]
    lines.append(f"- {h['streams']} slow streams held at once: {h['errors']} errors in "
                 f"{h['seconds']} s; peak RSS MB {h['rss_mb_peak']}")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return {
        "cores": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "grpcio": grpc.__version__,
        "aiohttp": aiohttp.__version__, "date": time.strftime("%Y-%m-%d"),
        "wrk": (wrk_version.stdout or wrk_version.stderr).split("\n")[0].strip(),
        # Other work on the machine while the bench ran: the figures' conditions.
        "load_average_1m_before": round(os.getloadavg()[0], 2),
    }


def start_lean_doubles(tmp: Path) -> dict[str, Double]:
    doubles = {}
    for model in MODELS:
        port = free_port()
        proc = start(python_module("tools.lean_tgi_double", "--port", str(port),
                                   "--model-id", f"lean/{model}"),
                     log_path=tmp / f"double-{model}.log")
        doubles[model] = Double(f"http://127.0.0.1:{port}", proc)
    try:
        for double in doubles.values():
            wait_http(f"{double.url}/health", 30, double.proc)
    except Exception:
        for double in doubles.values():
            stop(double.proc)
        raise
    return doubles


def main() -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--latency-requests", type=int, default=300)
    p.add_argument("--seconds", type=float, default=5.0, help="wrk's duration per run")
    p.add_argument("--stream-tokens", type=int, default=2000)
    p.add_argument("--held-streams", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: make wrk (Debian package wrk)")
    if args.quick:
        args.runs, args.latency_requests, args.seconds = 1, 50, 2.0
        args.stream_tokens, args.held_streams = 200, 50
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="llmmesh-bench-") as tmp:
        # Limits above the held streams, so the bench measures the mesh, not its limits.
        limit = str(max(2048, args.held_streams * 2))
        doubles = start_lean_doubles(Path(tmp))
        try:
            mesh = start_mesh(Path(tmp), doubles, "--max-concurrent-requests", limit)
            try:
                results = measure(mesh, args, Path(tmp))
            finally:
                stop_mesh(mesh)
        finally:
            for double in doubles.values():
                stop(double.proc)
    results["machine"] = machine()
    results["machine"]["load_average_1m_before"] = round(load_before, 2)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nfigures: {args.json}")
    return results


if __name__ == "__main__":
    main()
