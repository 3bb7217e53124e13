"""The CPU backend through the whole mesh versus llama.cpp in-process.

    python -m tests.bench.cpu_mesh_bench [--requests 3] [--max-new-tokens 64]

Starts the local mesh with CPU backends (SmolLM2, the same threads as the
in-process run), streams the same prompts through Envoy with the `raw`
scenario and greedy decoding, and compares generation tokens/s with
llama.cpp called directly. The ratio is what the mesh costs on a real model.
Then 40 requests for one model at once: every one must be answered, none
refused, with `make up`'s default limits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from services.cpu_backend.settings import default_model_path
from tests.bench.cpu_backend_bench import Sample, bench_in_process, prompts
from tests.harness.mesh import free_run, stop_launcher, wait_launcher
from tests.harness.procs import free_port, python_module, start


async def bench_mesh(url: str, texts: list[str], max_new: int) -> list[Sample]:
    samples = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for text in texts:
            body = {"model_id": "qwen2", "inputs": text, "scenario": "raw",
                    "parameters": {"max_new_tokens": max_new}}
            t0 = time.perf_counter()
            first = last = t0
            first_tokens = tokens = 0
            final: dict[str, Any] = {}
            async with session.post(f"{url}/v1/generate_stream", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    event = json.loads(line[5:])
                    now = time.perf_counter()
                    if event.get("text") and not first_tokens:
                        first, first_tokens = now, event["tokens"]
                    if event.get("text"):
                        last, tokens = now, event["tokens"]
                    final = event
            # Tokens after the first message, over the time after it.
            decoded = tokens - first_tokens + 1
            samples.append(Sample(final["input_tokens"], decoded, first - t0, last - first))
    return samples[1:]


async def crowd(url: str, n: int, max_new: int) -> dict[str, Any]:
    """n requests for one model at once: how many answered, refused, and how fast."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def one(i: int) -> int:
            body = {"model_id": "qwen2", "inputs": f"Tell me fact number {i} about the sea.",
                    "parameters": {"max_new_tokens": max_new}}
            async with session.post(f"{url}/v1/generate", json=body) as resp:
                await resp.read()
                return resp.status

        t0 = time.perf_counter()
        statuses = await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    return {
        "requests": n,
        "max_new_tokens": max_new,
        "answered": sum(1 for s in statuses if s == 200),
        "refused_429": sum(1 for s in statuses if s == 429),
        "other": sum(1 for s in statuses if s not in (200, 429)),
        "seconds": round(wall, 2),
    }


def main() -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args, _ = p.parse_known_args()
    model = default_model_path()
    assert model is not None and model.is_file(), "run scripts/install_llama_cpp.sh"
    texts = prompts(args.requests, args.prompt_words)
    direct = bench_in_process(model, texts, args.max_new_tokens, args.threads)
    with tempfile.TemporaryDirectory(prefix="llmmesh-cpu-bench-") as tmp:
        envoy = free_port()
        launcher = start(python_module(
            "services.launcher", "--run-dir", f"{tmp}/run", "--envoy-port", str(envoy),
            "--admin-port", str(free_port()), "--router-port", str(free_port()),
            "--adapter-port", str(free_run(2)), "--backend-port", str(free_run(2)),
            "--metrics-port", str(free_run(3)), "--openai-port", str(free_port()),
            "--no-prometheus",
            "--threads", str(args.threads)), log_path=Path(tmp) / "launcher.log")
        try:
            wait_launcher(Path(tmp) / "launcher.log", launcher, 180)
            meshed = asyncio.run(bench_mesh(f"http://127.0.0.1:{envoy}", texts,
                                            args.max_new_tokens))
            crowded = asyncio.run(crowd(f"http://127.0.0.1:{envoy}", 40, 16))
        finally:
            stop_launcher(launcher)

    def rate(samples: list[Sample]) -> float:
        return statistics.median(
            (s.generated_tokens - 1) / s.decode_time for s in samples if s.decode_time > 0
        )

    result = {
        "model": model.name, "threads": args.threads, "requests": args.requests,
        "max_new_tokens": args.max_new_tokens,
        "llama_cpp_tokens_per_s": round(rate(direct), 1),
        "mesh_tokens_per_s": round(rate(meshed), 1),
        "llama_cpp_ttft_ms": round(statistics.median(s.ttft for s in direct) * 1000),
        "mesh_ttft_ms": round(statistics.median(s.ttft for s in meshed) * 1000),
    }
    result["ratio"] = round(result["mesh_tokens_per_s"] / result["llama_cpp_tokens_per_s"], 3)
    result["crowd"] = crowded
    print(f"CPU backend through Envoy vs llama.cpp in-process ({model.name}, "
          f"{args.threads} threads, greedy, {args.max_new_tokens} new tokens):")
    print(f"- llama.cpp {result['llama_cpp_tokens_per_s']} tokens/s, "
          f"through the mesh {result['mesh_tokens_per_s']} tokens/s: ratio {result['ratio']}")
    print(f"- time to first token: {result['llama_cpp_ttft_ms']} ms in-process, "
          f"{result['mesh_ttft_ms']} ms through the mesh")
    print(f"- {crowded['requests']} concurrent requests for one model ({crowded['max_new_tokens']} "
          f"tokens each): {crowded['answered']} answered, {crowded['refused_429']} refused (429), "
          f"{crowded['other']} other errors, in {crowded['seconds']} s")
    return result


if __name__ == "__main__":
    main()
