"""Load-test an llmmesh deployment (or any OpenAI-compatible server).

    python -m tools.loadtest --url http://gpu-host:8000 [options]
    make loadtest URL=http://gpu-host:8000 [ARGS="--concurrency 1,4,8"]

Examples:
    # a concurrency sweep over the native HTTP API, the shipped dataset, SLOs
    python -m tools.loadtest --url http://gpu-host:8000 --model qwen2,llama3 \\
        --concurrency 1,2,4,8 --slo-ttft-ms 500 --slo-tpot-ms 50
    # Poisson arrivals at three rates over gRPC, generated prompts
    python -m tools.loadtest --url http://gpu-host:8000 --api grpc --rate 0.5,1,2 \\
        --input-tokens uniform:100:500 --output-tokens fixed:128 --duration 120
    # bursty arrivals (gamma shape 0.5) against an OpenAI-compatible server
    python -m tools.loadtest --url http://host:8000/v1 --api openai --model qwen2 \\
        --rate 2 --burstiness 0.5
    # shared prefixes: 4 system prompts of ~1,000 tokens, 8 conversations of
    # 6 turns, with the CPU backends' cache hits (make up REPLICAS=2)
    python -m tools.loadtest --model llama3 --prefixes 4 --prefix-tokens 1000 \\
        --conversations 8 --turns 6 --concurrency 4 --requests 48 \\
        --cache-metrics http://127.0.0.1:8083/metrics,http://127.0.0.1:8084/metrics

Each step of the sweep runs until --requests requests were sent or
--duration seconds passed. Figures per model and step: TTFT, TPOT, ITL and
E2E (p50/p90/p95/p99), request and output-token throughput, errors by
reason (429s counted apart), goodput within the SLOs, and, with
--cache-metrics, the share of prompt tokens the engines served from their
prefix caches ("n/a" where they do not say). Every option has an
environment variable, shown in brackets.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tools.loadtest import report
from tools.loadtest.arrivals import Step, parse_steps
from tools.loadtest.clients import APIS, Target, make_client
from tools.loadtest.engine_metrics import CacheMetrics, cache_figures
from tools.loadtest.runner import Bounds, run_step
from tools.loadtest.stats import SLO, by_model, by_turn, per_request
from tools.loadtest.workload import (
    SYNTHETIC,
    Distribution,
    Item,
    SharedPrefix,
    Workload,
    load_dataset,
)

DEFAULT_CONCURRENCY = "1,2,4,8"


@dataclass(frozen=True)
class Settings:
    url: str
    api: str
    grpc_target: str
    models: tuple[str, ...]
    scenario: str | None
    dataset: Path | None
    dataset_items: tuple[Item, ...] | None
    shared_prefix: SharedPrefix | None
    input_tokens: Distribution
    output_tokens: Distribution
    steps: tuple[Step, ...]
    warmup: int
    burstiness: float
    bounds: Bounds
    slo: SLO
    seed: int
    temperature: float | None
    api_key: str | None
    ca_file: str | None
    json_path: Path | None
    save_requests: bool
    plot_path: Path | None
    title: str | None
    progress: bool
    cache_metrics: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url, "api": self.api,
            "grpc_target": self.grpc_target if self.api == "grpc" else None,
            "models": list(self.models), "scenario": self.scenario,
            "dataset": str(self.dataset) if self.dataset else None,
            "shared_prefix": self.shared_prefix.describe() if self.shared_prefix else None,
            "input_tokens": None if self.dataset or self.shared_prefix
            else str(self.input_tokens),
            "output_tokens": str(self.output_tokens),
            "steps": [{"mode": s.mode, "value": s.json_value} for s in self.steps],
            "warmup": self.warmup,
            "burstiness": self.burstiness,
            "bounds": asdict(self.bounds), "slo": self.slo.describe(), "seed": self.seed,
            "temperature": self.temperature,
            "cache_metrics": list(self.cache_metrics),
        }


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"LOADTEST_{name}", default)


def _env_float(name: str) -> float | None:
    value = _env(name)
    return float(value) if value else None


def _env_int(name: str) -> int | None:
    value = _env(name)
    return int(value) if value else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("target")
    g.add_argument("--url", default=_env("URL", "http://127.0.0.1:8000"),
                   help="the deployment's HTTP address, Envoy's :8000 [LOADTEST_URL]")
    g.add_argument("--api", choices=APIS, default=_env("API", "http"),
                   help="http: /v1/generate_stream (SSE); grpc: llmmesh.v1 GenerateStream; "
                        "openai: /v1/chat/completions, streamed [LOADTEST_API]")
    g.add_argument("--grpc-target", default=_env("GRPC_TARGET"),
                   help="host:port for --api grpc; default: the URL's [LOADTEST_GRPC_TARGET]")
    g.add_argument("--model", default=_env("MODEL", "qwen2"),
                   help="model id(s), comma-separated; requests go to each in turn "
                        "[LOADTEST_MODEL]")
    g.add_argument("--api-key", default=os.environ.get("LLMMESH_API_KEY"),
                   help="sent as Authorization: Bearer [LLMMESH_API_KEY]")
    g.add_argument("--ca-file", default=_env("CA_FILE"),
                   help="CA certificate (PEM) of an https:// deployment, for HTTP and gRPC; "
                        "default: the system's [LOADTEST_CA_FILE]")
    w = p.add_argument_group("workload")
    w.add_argument("--dataset", default=_env("DATASET", "synthetic"),
                   help="JSONL of {prompt[, output_tokens, model, scenario]} (output_tokens "
                        "defaults from --output-tokens); 'synthetic' is "
                        "the shipped one; 'none' generates prompts from --input-tokens "
                        "[LOADTEST_DATASET]")
    w.add_argument("--input-tokens", default=_env("INPUT_TOKENS", "fixed:128"),
                   help="prompt length without a dataset: fixed:N or uniform:LOW:HIGH "
                        "[LOADTEST_INPUT_TOKENS]")
    w.add_argument("--output-tokens", default=_env("OUTPUT_TOKENS", "fixed:128"),
                   help="max new tokens without a dataset: fixed:N or uniform:LOW:HIGH "
                        "[LOADTEST_OUTPUT_TOKENS]")
    w.add_argument("--prefixes", type=int, default=_env_int("PREFIXES"),
                   help="shared-prefix workload: K system prompts shared by the "
                        "conversations (instead of --dataset) [LOADTEST_PREFIXES]")
    w.add_argument("--prefix-tokens", type=int, default=_env_int("PREFIX_TOKENS") or 1000,
                   help="length of each shared system prompt, in tokens approximated by "
                        "words [LOADTEST_PREFIX_TOKENS]")
    w.add_argument("--conversations", type=int, default=_env_int("CONVERSATIONS"),
                   help="conversations over the K prefixes (default: K) "
                        "[LOADTEST_CONVERSATIONS]")
    w.add_argument("--turns", type=int, default=_env_int("TURNS") or 4,
                   help="turns per conversation; each turn's prompt extends the last "
                        "[LOADTEST_TURNS]")
    w.add_argument("--suffix-tokens", type=int, default=_env_int("SUFFIX_TOKENS") or 32,
                   help="the user message each turn adds, in words [LOADTEST_SUFFIX_TOKENS]")
    w.add_argument("--scenario", default=_env("SCENARIO"),
                   help="llmmesh scenario (chat, qa, summarize, rewrite, raw) [LOADTEST_SCENARIO]")
    w.add_argument("--temperature", type=float, default=_env_float("TEMPERATURE"),
                   help="sampling temperature; default: the server's [LOADTEST_TEMPERATURE]")
    w.add_argument("--seed", type=int, default=int(_env("SEED", "0") or 0),
                   help="seed of prompts, lengths and arrivals [LOADTEST_SEED]")
    a = p.add_argument_group("load (one of --rate or --concurrency; a list is a sweep)")
    a.add_argument("--rate", default=_env("RATE"),
                   help="requests/s, e.g. 0.5,1,2 or inf (all at once) [LOADTEST_RATE]")
    a.add_argument("--burstiness", type=float, default=float(_env("BURSTINESS", "1") or 1),
                   help="gamma shape of the gaps between arrivals at a rate: 1 Poisson, "
                        "<1 burstier, >1 steadier [LOADTEST_BURSTINESS]")
    a.add_argument("--concurrency", default=_env("CONCURRENCY"),
                   help=f"clients each sending the next request when the last ends, e.g. "
                        f"{DEFAULT_CONCURRENCY} (the default) [LOADTEST_CONCURRENCY]")
    a.add_argument("--max-concurrency", type=int, default=_env_int("MAX_CONCURRENCY"),
                   help="at a rate, at most this many requests in flight "
                        "[LOADTEST_MAX_CONCURRENCY]")
    a.add_argument("--warmup", type=int, default=int(_env("WARMUP", "0") or 0),
                   help="requests sent one at a time before the first step and left out of "
                        "the figures [LOADTEST_WARMUP]")
    b = p.add_argument_group("bounds, per step of the sweep")
    b.add_argument("--requests", type=int, default=int(_env("REQUESTS", "50") or 50),
                   help="requests sent per step [LOADTEST_REQUESTS]")
    b.add_argument("--duration", type=float, default=float(_env("DURATION", "300") or 300),
                   help="seconds per step; requests in flight then finish [LOADTEST_DURATION]")
    b.add_argument("--request-timeout", type=float,
                   default=float(_env("REQUEST_TIMEOUT", "300") or 300),
                   help="seconds one request may take [LOADTEST_REQUEST_TIMEOUT]")
    s = p.add_argument_group("SLOs for goodput (milliseconds)")
    for name, what in (("ttft", "time to first token"), ("tpot", "time per output token"),
                       ("e2e", "end-to-end latency")):
        s.add_argument(f"--slo-{name}-ms", type=float, default=_env_float(f"SLO_{name.upper()}_MS"),
                       help=f"{what} bound [LOADTEST_SLO_{name.upper()}_MS]")
    m = p.add_argument_group("engines' prefix-cache figures")
    m.add_argument("--cache-metrics", default=_env("CACHE_METRICS", ""),
                   help="the engines' Prometheus /metrics URLs, comma-separated (CPU "
                        "backends: http://HOST:PORT/metrics; vLLM: its /metrics): each step "
                        "reports the share of prompt tokens their caches served "
                        "[LOADTEST_CACHE_METRICS]")
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, default=_env("JSON"),
                   help="write every figure here [LOADTEST_JSON]")
    o.add_argument("--save-requests", action="store_true",
                   default=_env("SAVE_REQUESTS", "0") == "1",
                   help="also put every request's figures in the JSON [LOADTEST_SAVE_REQUESTS=1]")
    o.add_argument("--plot", type=Path, default=_env("PLOT"),
                   help="write the plots here (PNG) [LOADTEST_PLOT]")
    o.add_argument("--title", default=_env("TITLE"), help="plot title [LOADTEST_TITLE]")
    o.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   default=(_env("PROGRESS") or "auto") != "0" and sys.stderr.isatty(),
                   help="a progress bar on stderr (default: on a terminal) [LOADTEST_PROGRESS=0]")
    return p


def settings_from(argv: Sequence[str] | None = None) -> Settings:
    p = parser()
    args = p.parse_args(argv)
    try:
        if args.rate and args.concurrency:
            raise ValueError("give --rate or --concurrency, not both")
        steps = (parse_steps("rate", args.rate) if args.rate
                 else parse_steps("concurrency", args.concurrency or DEFAULT_CONCURRENCY))
        models = tuple(m.strip() for m in args.model.split(",") if m.strip())
        if not models:
            raise ValueError("--model: at least one model id")
        if args.requests < 1 or args.duration <= 0 or args.request_timeout <= 0:
            raise ValueError("--requests, --duration and --request-timeout must be > 0")
        if args.ca_file and not Path(args.ca_file).is_file():
            raise ValueError(f"--ca-file: no file {args.ca_file}")
        if args.warmup < 0:
            raise ValueError("--warmup must be >= 0")
        if args.burstiness <= 0:
            raise ValueError("--burstiness must be > 0")
        if args.max_concurrency is not None and args.max_concurrency < 1:
            raise ValueError("--max-concurrency must be >= 1")
        shared = None
        if args.prefixes is not None:
            shared = SharedPrefix(args.prefixes, args.prefix_tokens, args.turns,
                                  args.suffix_tokens, args.conversations)
        dataset = None
        if args.dataset and args.dataset != "none" and shared is None:
            dataset = SYNTHETIC if args.dataset == "synthetic" else Path(args.dataset)
        cache_urls = tuple(u.strip() for u in args.cache_metrics.split(",") if u.strip())
        for u in cache_urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"--cache-metrics: expected http://HOST:PORT/metrics, got {u!r}")
        output_tokens = Distribution.parse(args.output_tokens)
        items = tuple(load_dataset(dataset, output_tokens, args.seed)) if dataset else None
        url = args.url if "://" in args.url else f"http://{args.url}"
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"--url: no host in {args.url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return Settings(
            url=url, api=args.api, grpc_target=args.grpc_target or f"{parts.hostname}:{port}",
            models=models, scenario=args.scenario, dataset=dataset, dataset_items=items,
            shared_prefix=shared, cache_metrics=cache_urls,
            input_tokens=Distribution.parse(args.input_tokens),
            output_tokens=output_tokens,
            steps=tuple(steps), warmup=args.warmup, burstiness=args.burstiness,
            bounds=Bounds(args.requests, args.duration, args.request_timeout,
                          args.max_concurrency),
            slo=SLO(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms), seed=args.seed,
            temperature=args.temperature, api_key=args.api_key, ca_file=args.ca_file,
            json_path=args.json,
            save_requests=args.save_requests,
            plot_path=args.plot, title=args.title, progress=args.progress,
        )
    except ValueError as exc:
        p.error(str(exc))


async def run(settings: Settings) -> dict[str, Any]:
    """Every step of the sweep against the target; the results as a JSON-ready dict."""
    workload = Workload(settings.models, dataset=settings.dataset_items,
                        input_tokens=settings.input_tokens,
                        output_tokens=settings.output_tokens, scenario=settings.scenario,
                        seed=settings.seed, shared_prefix=settings.shared_prefix)
    cache = CacheMetrics(settings.cache_metrics)
    target = Target(settings.url, settings.grpc_target, settings.api_key, settings.temperature,
                    settings.ca_file)
    hint = max(int(s.value) if s.mode == "concurrency" else 256 for s in settings.steps)
    client = make_client(settings.api, target, hint)
    results: dict[str, Any] = {
        "settings": settings.describe(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cores": os.cpu_count(),
                    "platform": platform.platform()},
        "steps": [],
    }
    try:
        if settings.warmup:
            warm = await run_step(
                client, workload.items(), Step("concurrency", 1),
                Bounds(settings.warmup, settings.bounds.request_timeout * settings.warmup,
                       settings.bounds.request_timeout),
                progress_out=sys.stderr if settings.progress else None, label="warm-up")
            results["warmup"] = {"requests": len(warm),
                                 "failures": sum(1 for r in warm if not r.ok)}
        for i, step in enumerate(settings.steps):
            items = workload.items()  # every step sends the same requests
            before = await cache.sample()
            records = await run_step(
                client, items, step, settings.bounds, seed=settings.seed + i,
                burstiness=settings.burstiness,
                progress_out=sys.stderr if settings.progress else None)
            figures: dict[str, Any] = {"mode": step.mode, "value": step.json_value,
                                       "label": step.label,
                                       "models": by_model(records, settings.slo),
                                       "cache": cache_figures(before, await cache.sample())}
            if settings.shared_prefix is not None:
                figures["turns"] = by_turn(records)
            if settings.save_requests:
                figures["requests"] = [per_request(r, records[0].start) for r in records]
            results["steps"].append(figures)
    finally:
        await client.close()
        await cache.close()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_from(argv)
    try:
        import uvloop
    except ImportError:
        results = asyncio.run(run(settings))
    else:
        results = uvloop.run(run(settings))
    print(report.table(results))
    if settings.json_path:
        report.write_json(results, settings.json_path)
        print(f"figures: {settings.json_path}")
    if settings.plot_path:
        try:
            report.plot(results, settings.plot_path, settings.title)
        except ImportError:
            print("no plots: they need matplotlib (pip install 'llmmesh[loadtest]')",
                  file=sys.stderr)
            return 1
        print(f"plots: {settings.plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
