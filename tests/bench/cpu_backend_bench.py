"""Speed of the CPU backend over HTTP vs llama.cpp in-process, alone and batched.

    .venv/bin/python -m tests.bench.cpu_backend_bench [--requests 3]
        [--max-new-tokens 64] [--prompt-words 200] [--threads 2] [--url URL]
        [--json FILE]

Without --url it starts `python -m services.cpu_backend` on a free port and
stops it at the end. Four measurements, in one run on the same machine:

1. one request at a time, greedy, distinct prompts (so llama.cpp's prefix
   cache cannot help), after one warm-up each: llama.cpp's `Llama` class
   in-process (the engine the backend used before batching) vs the backend;
2. the raw ceiling: a bare `llama_decode` loop with N greedy sequences
   stepping together (no server, no sampling chain, argmax in numpy);
3. the backend with N concurrent streams: aggregate generation tokens/s,
   against the raw loop at the same N, and the backend's own scheduler and
   llama.cpp model driven in-process (no HTTP) to tell the two costs apart;
4. time to first token of a new request while 4 streams run, against idle.

prompt tok/s = prompt tokens / time to first token
gen tok/s    = (generated tokens - 1) / (time of last token - time of first)
aggregate    = tokens of all streams / time, while every stream is running
               (from the last first token to the first last token)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from services.cpu_backend.settings import default_model_path
from tests.harness.procs import free_port, python_module, start, stop, wait_http

FILLER = (
    "The harbour town woke slowly, fishermen mending nets while gulls argued over "
    "scraps and the bakery sent warm bread smells down the cobbled lanes. "
)


@dataclass
class Sample:
    prompt_tokens: int
    generated_tokens: int
    ttft: float
    decode_time: float


def prompts(count: int, words: int) -> list[str]:
    body = " ".join((FILLER * (words // 20 + 1)).split()[:words])
    # A distinct first line per request defeats llama.cpp's prefix cache.
    return [
        f"<|im_start|>user\nRequest {i}: summarise this text.\n{body}<|im_end|>\n"
        "<|im_start|>assistant\n"
        for i in range(count + 1)  # +1: warm-up
    ]


def bench_in_process(model: Path, texts: list[str], max_new: int, threads: int) -> list[Sample]:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(model), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
        verbose=False,
    )  # fmt: skip
    samples = []
    try:
        for text in texts:
            ids = llm.tokenize(text.encode(), add_bos=True, special=True)
            t0 = time.perf_counter()
            first = last = t0
            n = 0
            for token in llm.generate(ids, top_k=0, top_p=1.0, min_p=0.0, temp=0.0):
                last = time.perf_counter()
                if n == 0:
                    first = last
                n += 1
                if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or n >= max_new:
                    break
            samples.append(Sample(len(ids), n, first - t0, last - first))
    finally:
        llm.close()
    return samples[1:]


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """Each `data:` event of TGI's /generate_stream; an in-band error raises."""
    resp.raise_for_status()
    while block := await resp.content.readuntil(b"\n\n"):
        if not block.startswith(b"data:"):
            continue
        event = json.loads(block[5:])
        if "error" in event:
            raise RuntimeError(event)
        yield event


async def bench_http(url: str, texts: list[str], max_new: int) -> list[Sample]:
    samples = []
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for text in texts:
            payload = {"inputs": text, "parameters": {"max_new_tokens": max_new, "details": True}}
            t0 = time.perf_counter()
            first = last = t0
            n = 0
            final: dict = {}
            async with session.post(url + "/generate_stream", json=payload) as resp:
                async for event in sse_events(resp):
                    last = time.perf_counter()
                    if n == 0:
                        first = last
                    n += 1
                    final = event
            samples.append(Sample(final["details"]["input_length"], n, first - t0, last - first))
    return samples[1:]


def raw_decode_loop(
    model: Path, n_seqs: int, steps: int, threads: int, unified: bool = False
) -> float:
    """Tokens/s of N greedy sequences stepping together in bare llama.cpp."""
    import llama_cpp as lib
    import llama_cpp._logger
    import numpy as np

    llama_cpp._logger.set_verbose(False)
    lib.llama_backend_init()
    m = lib.llama_model_load_from_file(str(model).encode(), lib.llama_model_default_params())
    params = lib.llama_context_default_params()
    params.n_ctx = 2048 * n_seqs
    params.n_batch = params.n_ubatch = 512
    params.n_seq_max = n_seqs
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = unified
    ctx = lib.llama_init_from_model(m, params)
    vocab = lib.llama_model_get_vocab(m)
    n_vocab = lib.llama_vocab_n_tokens(vocab)
    batch = lib.llama_batch_init(512, 0, 1)

    def put(i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, logits

    def argmax(i: int) -> int:
        row = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
        return int(row.argmax())

    try:
        last, pos = [], []
        for seq in range(n_seqs):
            text = f"<|im_start|>user\nStory {seq}: tell me about the sea.<|im_end|>\n"
            text += "<|im_start|>assistant\n"
            data = text.encode()
            buf = (lib.llama_token * 256)()
            n = lib.llama_tokenize(vocab, data, len(data), buf, 256, True, True)
            for j in range(n):
                put(j, buf[j], j, seq, j == n - 1)
            batch.n_tokens = n
            assert lib.llama_decode(ctx, batch) == 0
            last.append(argmax(n - 1))
            pos.append(n)
        t0 = time.perf_counter()
        for _ in range(steps):
            for seq in range(n_seqs):
                put(seq, last[seq], pos[seq], seq, True)
            batch.n_tokens = n_seqs
            assert lib.llama_decode(ctx, batch) == 0
            for seq in range(n_seqs):
                last[seq] = argmax(seq)
                pos[seq] += 1
        return n_seqs * steps / (time.perf_counter() - t0)
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        lib.llama_model_free(m)


QUESTIONS = [
    "Write a short story about a lighthouse keeper.", "Explain how rain forms.",
    "List five fruits and their colours.", "Describe a busy market in the morning.",
    "What is the capital of France?", "Give three tips for learning to cook.",
    "Why is the sky blue?", "Write a poem about autumn leaves.",
]  # fmt: skip


def greedy_divergence(model: Path, threads: int, max_new: int = 64) -> dict[str, Any]:
    """How often, and how early, greedy output in a batch differs from alone.

    Each prompt runs alone, then all of them together (a batch of len(QUESTIONS)),
    through the backend's own scheduler and llama.cpp model, no HTTP.
    """
    from services.cpu_backend.engine import SamplingParams
    from services.cpu_backend.llama_model import LlamaBatchModel
    from services.cpu_backend.scheduler import BatchScheduler
    from services.cpu_backend.settings import BatchSettings, LlamaSettings

    size = len(QUESTIONS)
    llama = LlamaBatchModel(
        LlamaSettings(model_path=model, n_ctx=size * 512, n_seq_max=size, n_threads=threads)
    )
    params = SamplingParams(max_new_tokens=max_new, do_sample=False)

    async def run() -> tuple[list[list[int]], list[list[int]]]:
        sched = BatchScheduler(llama, BatchSettings(max_batch_size=size))
        try:
            prompts = [
                await sched.tokenize(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
                for q in QUESTIONS
            ]

            async def one(ids: list[int]) -> list[int]:
                return [t.id async for t in sched.generate_tokens(ids, params)]

            alone = [await one(ids) for ids in prompts]
            together = await asyncio.gather(*(one(ids) for ids in prompts))
            return alone, list(together)
        finally:
            await sched.close()

    alone, together = asyncio.run(run())
    firsts = []
    for a, b in zip(alone, together, strict=True):
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if first is None and len(a) != len(b):
            first = min(len(a), len(b))
        firsts.append(first)
    differing = [f for f in firsts if f is not None]
    return {
        "prompts": size,
        "tokens_each": max_new,
        "differing": len(differing),
        "first_difference_at": sorted(differing),
    }


def scheduler_in_process(model: Path, threads: int, sizes: tuple[int, ...], max_new: int) -> dict:
    """Aggregate tokens/s of the backend's scheduler and llama.cpp model, no HTTP."""
    from services.cpu_backend.engine import SamplingParams
    from services.cpu_backend.llama_model import LlamaBatchModel
    from services.cpu_backend.scheduler import BatchScheduler
    from services.cpu_backend.settings import BatchSettings, LlamaSettings

    batch = max(sizes)
    llama = LlamaBatchModel(
        LlamaSettings(model_path=model, n_ctx=batch * 1024, n_seq_max=batch, n_threads=threads)
    )
    params = SamplingParams(max_new_tokens=max_new, do_sample=False)

    async def run() -> dict[int, float]:
        sched = BatchScheduler(llama, BatchSettings(max_batch_size=batch))

        async def one(text: str) -> list[float]:
            ids = await sched.tokenize(text)
            return [time.perf_counter() async for _ in sched.generate_tokens(ids, params)]

        try:
            await one(_story(999))
            out = {}
            for n in sizes:
                times = await asyncio.gather(*(one(_story(i)) for i in range(n)))
                out[n] = steady_rate(list(times))
            return out
        finally:
            await sched.close()

    return asyncio.run(run())


@dataclass
class Stream:
    start: float
    first: float
    last: float
    tokens: int
    # Arrival time of every token.
    times: list[float]


def steady_rate(times: list[list[float]]) -> float:
    """Tokens/s while every stream is running: from the last first token to the
    first last token (prefill and early EOS left out, like the raw loop)."""
    begin = max(t[0] for t in times)
    end = min(t[-1] for t in times)
    if end <= begin:
        return sum(len(t) - 1 for t in times) / (max(t[-1] for t in times) - begin)
    inside = sum(1 for t in times for x in t if begin < x <= end)
    return inside / (end - begin)


async def _stream(
    session: aiohttp.ClientSession, url: str, text: str, max_new: int
) -> Stream:
    payload = {"inputs": text, "parameters": {"max_new_tokens": max_new}}
    t0 = time.perf_counter()
    times: list[float] = []
    async with session.post(url + "/generate_stream", json=payload) as resp:
        async for _ in sse_events(resp):
            times.append(time.perf_counter())
    return Stream(t0, times[0], times[-1], len(times), times)


def _story(i: int) -> str:
    return (
        f"<|im_start|>user\nStory {i}: write a long story about the sea and a lighthouse."
        "<|im_end|>\n<|im_start|>assistant\n"
    )


async def bench_concurrent(url: str, n: int, max_new: int) -> float:
    """Aggregate generation tokens/s of n streams started together (steady state)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await _stream(session, url, _story(999), 4)  # warm-up
        streams = await asyncio.gather(
            *(_stream(session, url, _story(i), max_new) for i in range(n))
        )
    return steady_rate([s.times for s in streams])


async def bench_ttft_under_load(url: str, running: int, max_new: int) -> tuple[float, float]:
    """Median time to first token of a short request: idle, then beside `running` streams."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await _stream(session, url, _story(999), 1)  # warm-up
        idle_ttft = []
        for i in range(5):
            s = await _stream(session, url, _story(600 + i), 1)
            idle_ttft.append(s.first - s.start)
        load = [
            asyncio.create_task(_stream(session, url, _story(i), max_new)) for i in range(running)
        ]
        await asyncio.sleep(1.0)  # the streams are decoding
        busy_ttft = []
        for i in range(5):
            s = await _stream(session, url, _story(700 + i), 1)
            busy_ttft.append(s.first - s.start)
            await asyncio.sleep(0.05)
        for task in load:
            task.cancel()
        await asyncio.gather(*load, return_exceptions=True)
    return statistics.median(idle_ttft), statistics.median(busy_ttft)


def report(name: str, samples: list[Sample]) -> str:
    prompt_tps = statistics.mean(s.prompt_tokens / s.ttft for s in samples)
    gen_tps = statistics.mean(
        (s.generated_tokens - 1) / s.decode_time for s in samples if s.generated_tokens > 1
    )
    ttft_ms = statistics.mean(s.ttft for s in samples) * 1000
    toks = statistics.mean(s.prompt_tokens for s in samples)
    gens = statistics.mean(s.generated_tokens for s in samples)
    return f"{name:<26}{prompt_tps:>14.0f}{gen_tps:>12.1f}{ttft_ms:>10.0f}{toks:>10.0f}{gens:>8.0f}"


def gen_rate(samples: list[Sample]) -> float:
    return statistics.mean(
        (s.generated_tokens - 1) / s.decode_time for s in samples if s.generated_tokens > 1
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=128,
                        help="tokens per stream in the batched runs")
    parser.add_argument("--url", default=None, help="an already running backend")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args, _ = parser.parse_known_args(argv)
    model = default_model_path()
    if model is None or not model.is_file():
        raise SystemExit("SmolLM2 GGUF not found: run scripts/install_llama_cpp.sh")
    texts = prompts(args.requests, args.prompt_words)

    local = bench_in_process(model, texts, args.max_new_tokens, args.threads)
    divergence = greedy_divergence(model, args.threads)
    raw = {n: raw_decode_loop(model, n, 64, args.threads) for n in (1, 4, 8)}
    in_process = scheduler_in_process(model, args.threads, (1, 4, 8), args.batch_tokens)
    proc = None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = python_module(
            "services.cpu_backend", "--port", str(port), "--threads", str(args.threads),
            "--log-level", "WARNING",
        )  # fmt: skip
        proc = start(cmd)
        wait_http(url + "/health", timeout=120, proc=proc)
    try:
        remote = asyncio.run(bench_http(url, texts, args.max_new_tokens))
        served = {n: asyncio.run(bench_concurrent(url, n, args.batch_tokens)) for n in (1, 4, 8)}
        idle_ttft, busy_ttft = asyncio.run(bench_ttft_under_load(url, 4, 400))
    finally:
        if proc is not None:
            stop(proc)

    result: dict[str, Any] = {
        "model": model.name,
        "threads": args.threads,
        "single_stream": {
            "llama_cpp_in_process_tokens_per_s": round(gen_rate(local), 1),
            "backend_tokens_per_s": round(gen_rate(remote), 1),
        },
        "raw_decode_loop_tokens_per_s": {str(n): round(v, 1) for n, v in raw.items()},
        "backend_aggregate_tokens_per_s": {str(n): round(v, 1) for n, v in served.items()},
        "backend_vs_raw": {str(n): round(served[n] / raw[n], 3) for n in raw},
        "scheduler_in_process_tokens_per_s": {str(n): round(v, 1) for n, v in in_process.items()},
        "greedy_alone_vs_batch": divergence,
        "ttft_idle_ms": round(idle_ttft * 1000, 1),
        "ttft_beside_4_streams_ms": round(busy_ttft * 1000, 1),
    }
    single = result["single_stream"]
    single["ratio"] = round(
        single["backend_tokens_per_s"] / single["llama_cpp_in_process_tokens_per_s"], 3
    )
    result["ttft_ratio"] = round(busy_ttft / idle_ttft, 2)

    print(f"model {model.name}, {args.threads} threads, {args.requests} requests, greedy")
    print(f"{'':<26}{'prompt tok/s':>14}{'gen tok/s':>12}{'ttft ms':>10}{'prompt':>10}{'gen':>8}")
    print(report("llama.cpp in-process", local))
    print(report("cpu_backend over HTTP", remote))
    print(f"one stream alone: backend/in-process = {single['ratio']}")
    print(
        f"\n{'streams':<10}{'raw loop tok/s':>16}{'scheduler, no HTTP':>20}"
        f"{'backend tok/s':>16}{'backend/raw':>13}"
    )
    for n in raw:
        print(
            f"{n:<10}{raw[n]:>16.1f}{in_process[n]:>20.1f}{served[n]:>16.1f}"
            f"{served[n] / raw[n]:>13.2f}"
        )
    print(
        f"\ntime to first token: {idle_ttft * 1000:.0f} ms idle, "
        f"{busy_ttft * 1000:.0f} ms beside 4 streams (x{result['ttft_ratio']})"
    )
    print(
        f"greedy alone vs in a batch of {divergence['prompts']}: "
        f"{divergence['differing']} of {divergence['prompts']} differ within "
        f"{divergence['tokens_each']} tokens, first differences at "
        f"{divergence['first_difference_at'] or 'none'}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
