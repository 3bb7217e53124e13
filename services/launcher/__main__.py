"""`make up`: start the whole local mesh and keep it in the foreground.

    python -m services.launcher [--backends "qwen2=vllm+http://HOST:PORT/v1 llama3=http://HOST:PORT"]
        [--replicas N] [--api-keys-file FILE] [--tenants-file FILE [--quota-store redis]] [--tls]

Without --backends every model gets a CPU backend (TGI's HTTP API over
llama.cpp, SmolLM2 standing in for the real model); --replicas N gives each
such model N CPU backends, each with its own adapter, which the router
balances as replicas of the model. --backends takes several URLs of one
model comma-separated (qwen2=http://a:1,http://b:2): one adapter each.

Each process is supervised from the moment it is ready, while the later
ones still start. When every replica of a model is down, the output says
which model and since when, and again when it serves.

{restarts}

Ctrl-C, SIGINT or SIGTERM stops every process it started, in reverse order,
gracefully.

Every flag can also come from the environment, as shown below; children
inherit the environment (OTEL_*, LLMMESH_LOG_LEVEL, ...).
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import textwrap
from pathlib import Path

from services.common import envflags
from services.launcher import certs
from services.launcher.plan import LaunchError, Ports, build_plan, parse_backends
from services.launcher.supervisor import RestartPolicy, Supervisor

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = RestartPolicy()
    description = (__doc__ or "").replace("{restarts}", textwrap.fill(defaults.describe(), 76))
    p = argparse.ArgumentParser(prog="python -m services.launcher", description=description,
                                epilog="tracing: the OTEL_* variables of this environment "
                                       "reach every process, Envoy's tracer included "
                                       "(docs/tracing.md)",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--backends", default="",
        help='existing engines, e.g. "qwen2=openai+http://gpu:8000/v1 llama3=http://gpu:8081": '
             "a URL without a KIND+ prefix is TGI; KIND is openai, vllm, sglang, llamacpp "
             "or ollama",
    )
    p.add_argument("--replicas", type=int, default=1,
                   help="CPU backends, each with its adapter, per model without --backends")
    p.add_argument("--run-dir", type=Path, default=ROOT / ".run", help="logs and rendered configs")
    p.add_argument("--host", default="127.0.0.1", help="address every service binds to")
    p.add_argument("--envoy-port", type=int, default=8000, help="HTTP/JSON and gRPC")
    p.add_argument("--admin-port", type=int, default=9901, help="Envoy's admin")
    p.add_argument("--router-port", type=int, default=50051)
    p.add_argument("--openai-port", type=int, default=None,
                   help="router's OpenAI-compatible HTTP listener (default: router port + 1)")
    p.add_argument("--adapter-port", type=int, default=50061, help="first adapter's port")
    p.add_argument("--backend-port", type=int, default=8081, help="first CPU backend's port")
    p.add_argument("--metrics-port", type=int, default=9464, help="router's; adapters follow")
    p.add_argument("--prometheus-port", type=int, default=9090)
    p.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus")
    p.add_argument("--model-path", type=Path, default=None,
                   help="GGUF file for the CPU backends (default: SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="llama.cpp threads per CPU backend")
    p.add_argument("--max-input-tokens", type=int, default=None,
                   help="CPU backends: most prompt tokens (their default: 1536)")
    p.add_argument("--max-total-tokens", type=int, default=None,
                   help="CPU backends: most prompt + generated tokens (their default: 2048)")
    p.add_argument("--max-concurrent-requests", type=int, default=None,
                   help="per model: backends (CPU or TGI) and their adapters take 128 by "
                        "default, TGI's own default; the CPU backend queues what it cannot "
                        "batch yet")
    p.add_argument("--max-in-flight-total", type=int, default=None,
                   help="the router's bound on requests in flight (its own default: 256); "
                        "Envoy's limit sits just above it")
    p.add_argument("--api-keys-file", type=Path, default=None,
                   help="require one of these API keys at the router (one per line)")
    p.add_argument("--tenants-file", type=Path, default=None,
                   help="tenants (keys, models, limits, priority, weight) for the router; "
                        "see docs/tenancy.md")
    p.add_argument("--quota-store", default=None,
                   help="redis: start a redis-server (on --redis-port) for the tenants' "
                        "counters; or a redis://HOST:PORT URL to use; default: the router's "
                        "memory")
    p.add_argument("--redis-port", type=int, default=Ports.redis)
    p.add_argument("--tls", action="store_true",
                   help="HTTPS and gRPC over TLS on the Envoy port, mutual TLS inside, with "
                        "development certificates from scripts/dev_ca.sh (made when missing)")
    p.add_argument("--tls-dir", type=Path, default=None,
                   help="where the certificates are (default: RUN_DIR/tls)")
    p.add_argument("--ready-timeout", type=float, default=180.0,
                   help="seconds each stage may take to start")
    p.add_argument("--restart-delay", type=float, default=defaults.delay,
                   help="seconds before a dead process is started again; doubles with "
                        "each death within --restart-window")
    p.add_argument("--restart-max-delay", type=float, default=defaults.max_delay,
                   help="the longest wait before a restart")
    p.add_argument("--restart-limit", type=int, default=defaults.limit,
                   help="deaths within --restart-window after which a process is left stopped")
    p.add_argument("--restart-window", type=float, default=defaults.window, help="seconds")
    envflags.apply(p, os.environ, names={"backends": "BACKENDS"})
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Children run from the checkout's root: paths given relative to here must hold there.
    for name in ("run_dir", "model_path", "api_keys_file", "tls_dir", "tenants_file"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    try:
        backends = parse_backends(args.backends)
        policy = RestartPolicy(
            delay=args.restart_delay, max_delay=args.restart_max_delay,
            limit=args.restart_limit, window=args.restart_window,
        )
        tls_dir = (args.tls_dir or args.run_dir / "tls") if args.tls else None
        plan = build_plan(
            root=ROOT,
            run_dir=args.run_dir,
            host=args.host,
            ports=Ports(
                envoy=args.envoy_port, admin=args.admin_port, router=args.router_port,
                openai=args.openai_port if args.openai_port is not None
                else args.router_port + 1,
                adapter=args.adapter_port, backend=args.backend_port,
                metrics=args.metrics_port, prometheus=args.prometheus_port,
                redis=args.redis_port,
            ),
            backends=backends,
            model_path=args.model_path,
            threads=args.threads,
            max_concurrent_requests=args.max_concurrent_requests,
            max_in_flight_total=args.max_in_flight_total,
            prometheus=not args.no_prometheus,
            api_keys_file=args.api_keys_file,
            tls_dir=tls_dir,
            replicas=args.replicas,
            tenants_file=args.tenants_file,
            quota_store=args.quota_store,
            max_input_tokens=args.max_input_tokens,
            max_total_tokens=args.max_total_tokens,
        )
        if plan.tls is not None and certs.ensure(plan.tls):
            print(f"made development certificates in {plan.tls.dir}", flush=True)
    except LaunchError as exc:
        print(f"make up: {exc}", file=sys.stderr)
        return 2
    supervisor = Supervisor(plan, log=functools.partial(print, flush=True), policy=policy)
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
