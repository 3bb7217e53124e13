"""Prompt and generation speed of the CPU backend over HTTP vs llama.cpp in-process.

    .venv/bin/python -m tests.bench.cpu_backend_bench [--requests 3]
        [--max-new-tokens 64] [--prompt-words 200] [--threads 2] [--url URL]

Without --url it starts `python -m services.cpu_backend` on a free port and
stops it at the end. Both sides get the same distinct prompts (so llama.cpp's
prefix cache cannot help either), one request at a time, greedy decoding,
after one warm-up request each.

prompt tok/s = prompt tokens / time to first token
gen tok/s    = (generated tokens - 1) / (time of last token - time of first)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from services.cpu_backend.settings import default_model_path
from tests.procs import free_port, python_module, start, stop, wait_http

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
                resp.raise_for_status()
                while block := await resp.content.readuntil(b"\n\n"):
                    if not block.startswith(b"data:"):
                        continue
                    event = json.loads(block[5:])
                    if "error" in event:
                        raise RuntimeError(event)
                    last = time.perf_counter()
                    if n == 0:
                        first = last
                    n += 1
                    final = event
            samples.append(Sample(final["details"]["input_length"], n, first - t0, last - first))
    return samples[1:]


def report(name: str, samples: list[Sample]) -> str:
    prompt_tps = statistics.mean(s.prompt_tokens / s.ttft for s in samples)
    gen_tps = statistics.mean(
        (s.generated_tokens - 1) / s.decode_time for s in samples if s.generated_tokens > 1
    )
    ttft_ms = statistics.mean(s.ttft for s in samples) * 1000
    toks = statistics.mean(s.prompt_tokens for s in samples)
    gens = statistics.mean(s.generated_tokens for s in samples)
    return f"{name:<26}{prompt_tps:>14.0f}{gen_tps:>12.1f}{ttft_ms:>10.0f}{toks:>10.0f}{gens:>8.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--url", default=None, help="an already running backend")
    args = parser.parse_args()
    model = default_model_path()
    if model is None or not model.is_file():
        print("SmolLM2 GGUF not found: run scripts/install_llama_cpp.sh", file=sys.stderr)
        return 2
    texts = prompts(args.requests, args.prompt_words)

    local = bench_in_process(model, texts, args.max_new_tokens, args.threads)
    proc = None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = python_module(
            "services.cpu_backend", "--port", str(port), "--threads", str(args.threads)
        )
        proc = start(cmd)
        wait_http(url + "/health", timeout=120, proc=proc)
    try:
        remote = asyncio.run(bench_http(url, texts, args.max_new_tokens))
    finally:
        if proc is not None:
            stop(proc)

    print(f"model {model.name}, {args.threads} threads, {args.requests} requests, greedy")
    print(f"{'':<26}{'prompt tok/s':>14}{'gen tok/s':>12}{'ttft ms':>10}{'prompt':>10}{'gen':>8}")
    print(report("llama.cpp in-process", local))
    print(report("cpu_backend over HTTP", remote))
    return 0


if __name__ == "__main__":
    sys.exit(main())
