"""`make up`: start the whole local mesh and keep it in the foreground.

    python -m services.launcher [--backends "qwen2=vllm+http://HOST:PORT/v1 llama3=http://HOST:PORT"]

Without --backends every model gets a CPU backend (TGI's HTTP API over
llama.cpp, SmolLM2 standing in for the real model). Ctrl-C, SIGINT or
SIGTERM stops every process it started, in reverse order, gracefully.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from pathlib import Path

from services.launcher.plan import LaunchError, Ports, build_plan, parse_backends
from services.launcher.supervisor import Supervisor

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.launcher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--backends", default=os.environ.get("BACKENDS", ""),
        help='existing engines, e.g. "qwen2=openai+http://gpu:8000/v1 llama3=http://gpu:8081": '
             "a URL without a KIND+ prefix is TGI; KIND is openai, vllm, sglang, llamacpp "
             "or ollama (env BACKENDS)",
    )
    p.add_argument("--run-dir", type=Path, default=ROOT / ".run", help="logs and rendered configs")
    p.add_argument("--host", default="127.0.0.1", help="address every service binds to")
    p.add_argument("--envoy-port", type=int, default=8000)
    p.add_argument("--admin-port", type=int, default=9901)
    p.add_argument("--router-port", type=int, default=50051)
    p.add_argument("--adapter-port", type=int, default=50061, help="first adapter's port")
    p.add_argument("--backend-port", type=int, default=8081, help="first CPU backend's port")
    p.add_argument("--metrics-port", type=int, default=9464, help="router's; adapters follow")
    p.add_argument("--prometheus-port", type=int, default=9090)
    p.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus")
    p.add_argument("--model-path", type=Path, default=None,
                   help="GGUF file for the CPU backends (default: SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="llama.cpp threads per CPU backend")
    p.add_argument("--max-concurrent-requests", type=int, default=None,
                   help="per model: CPU backends and their adapters take 4 by default, "
                        "adapters in front of TGI 128 (TGI's own default)")
    p.add_argument("--api-keys-file", type=Path, default=None,
                   help="require one of these API keys at the router (one per line)")
    p.add_argument("--ready-timeout", type=float, default=180.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        backends = parse_backends(args.backends)
        plan = build_plan(
            root=ROOT,
            run_dir=args.run_dir,
            host=args.host,
            ports=Ports(
                envoy=args.envoy_port, admin=args.admin_port, router=args.router_port,
                adapter=args.adapter_port, backend=args.backend_port,
                metrics=args.metrics_port, prometheus=args.prometheus_port,
            ),
            backends=backends,
            model_path=args.model_path,
            threads=args.threads,
            max_concurrent_requests=args.max_concurrent_requests,
            prometheus=not args.no_prometheus,
            api_keys_file=args.api_keys_file,
        )
    except LaunchError as exc:
        print(f"make up: {exc}", file=sys.stderr)
        return 2
    supervisor = Supervisor(plan, log=functools.partial(print, flush=True))
    stop = supervisor.request_stop
    signal.signal(signal.SIGINT, lambda *_: stop())
    signal.signal(signal.SIGTERM, lambda *_: stop())
    try:
        return supervisor.run(ready_timeout=args.ready_timeout)
    except LaunchError as exc:
        print(f"make up: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
