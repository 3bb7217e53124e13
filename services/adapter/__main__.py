"""Run one adapter: `python -m services.adapter --model qwen2 --engine-url URL`.

The engine is TGI by default; `--engine vllm` (or another OpenAI-compatible
kind, as listed under --engine) drives an OpenAI-compatible server at
`--engine-url http://HOST:PORT/v1`.
Engine settings not given here come from the model's `engine:` entry in the
registry. Every flag can also come from the environment (LLMMESH_MODEL,
ENGINE_URL or TGI_URL, ..., as shown below), which is how the containers are
configured.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import uvloop

from services.adapter import engines
from services.adapter.chat_template import ChatTemplate
from services.adapter.core import AdapterCore
from services.adapter.engine_load import LoadSampler
from services.adapter.engines import Engine
from services.common import engine_kinds, envflags, logs, tracing
from services.common.grpc_server import (
    ServerSettings,
    add_server_arguments,
    server_settings,
    start_server,
)
from services.common.health import HealthBoard
from services.common.metrics import Metrics
from services.common.registry import CHAT_APIS, ENGINE_KINDS, EngineSpec, ModelSpec, load_registry
from services.common.servicer import SERVICE_NAME
from services.common.signals import serve_until_signalled

log = logging.getLogger("llmmesh.adapter")


@dataclass(frozen=True)
class AdapterSettings:
    model: ModelSpec
    engine: EngineSpec  # the registry's, with the flags applied
    chat_template: Path
    server: ServerSettings
    max_concurrency: int
    default_timeout: float
    health_interval: float
    load_interval: float = 0.5
    engine_api_key: str | None = None

    @property
    def tgi_url(self) -> str:
        return self.engine.url


def parse_args(argv: list[str] | None = None) -> AdapterSettings:
    env = os.environ
    p = argparse.ArgumentParser(prog="python -m services.adapter", description=__doc__)
    add_server_arguments(p, default_port=50061)
    p.add_argument("--model", default=None, help="registry id, e.g. qwen2")
    p.add_argument(
        "--engine", choices=ENGINE_KINDS, default=None,
        help="the engine's kind (default: the registry's, else tgi): "
             + engine_kinds.describe(),
    )
    p.add_argument(
        "--engine-url", "--tgi-url", dest="engine_url",
        # TGI_URL is the older name, still honoured; ENGINE_URL wins.
        default=env.get("TGI_URL") or None,
        help="the engine's base URL: TGI http://HOST:PORT, the others http://HOST:PORT/v1 "
             "(TGI_URL also works)",
    )
    p.add_argument(
        "--served-model", default=None,
        help="the model name an OpenAI-compatible engine serves "
             "(default: the first on its /v1/models)",
    )
    p.add_argument(
        "--chat-api", choices=CHAT_APIS, default=None,
        help="adapter: render the chat template here and call /v1/completions; engine: "
             "send the conversation to /v1/chat/completions",
    )
    p.add_argument(
        "--engine-api-key-file", default=None,
        help="a file holding the key an OpenAI-compatible engine requires",
    )
    p.add_argument(
        "--load-interval", type=float, default=0.5,
        help="seconds between samples of the engine's /metrics for the router's choice of "
             "replica; 0 turns sampling off",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="a .jinja, tokenizer_config.json or .gguf file (default: the registry's)",
    )
    p.add_argument(
        "--max-concurrency", type=int, default=128,
        help="requests beyond this get RESOURCE_EXHAUSTED (match TGI's max-concurrent-requests)",
    )
    p.add_argument("--health-interval", type=float, default=2.0,
                   help="seconds between health checks of the engine")
    envflags.apply(p, env, names={"engine_url": "ENGINE_URL",
                                   "engine_api_key_file": "ENGINE_API_KEY_FILE"})
    args = p.parse_args(argv)
    if not args.model:
        p.error("--model (or LLMMESH_MODEL) is required")
    logs.setup(f"adapter-{args.model}", args.log_level)
    registry = load_registry(args.registry)
    model = registry.find(args.model)
    if model is None:
        known = ", ".join(m.id for m in registry.models)
        p.error(f"model {args.model!r} is not in {args.registry} (known: {known})")
    engine = EngineSpec(
        kind=args.engine or model.engine.kind,
        url=args.engine_url or model.engine.url,
        served_model=args.served_model or model.engine.served_model,
        chat_api=args.chat_api or model.engine.chat_api,
    )
    if engine.kind not in ENGINE_KINDS:
        p.error(f"engine kind {engine.kind!r} is not one of {', '.join(ENGINE_KINDS)}")
    if engine.chat_api not in CHAT_APIS:
        p.error(f"chat API {engine.chat_api!r} is not one of {', '.join(CHAT_APIS)}")
    if not engine.url:
        p.error(f"no engine URL for {model.id}: set --engine-url (or ENGINE_URL)")
    if engine.kind == "tgi" and engine.chat_api != "adapter":
        p.error("--chat-api engine needs an OpenAI-compatible engine, not TGI")
    template = args.chat_template or model.chat_template
    if template is None:
        p.error(f"no chat template for {model.id}: set --chat-template")
    api_key = None
    if args.engine_api_key_file:
        try:
            api_key = Path(args.engine_api_key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            p.error(f"cannot read --engine-api-key-file: {exc}")
    return AdapterSettings(
        model=model,
        engine=engine,
        chat_template=Path(template),
        server=server_settings(args),
        max_concurrency=args.max_concurrency,
        default_timeout=args.timeout,
        health_interval=args.health_interval,
        load_interval=args.load_interval,
        engine_api_key=api_key,
    )


def make_engine(settings: AdapterSettings) -> tuple[Engine, str | None]:
    """The engine driver, and the URL of the engine's metrics (None: it has none)."""
    engine = settings.engine
    return engines.make_engine(
        engine.kind, engine.url, served_model=engine.served_model or None,
        chat_api=engine.chat_api == "engine", api_key=settings.engine_api_key,
    )


async def run(settings: AdapterSettings) -> None:
    metrics = Metrics(f"adapter-{settings.model.id}")
    engine, metrics_url = make_engine(settings)
    sampler = (
        LoadSampler(metrics_url, settings.load_interval)
        if metrics_url is not None and settings.load_interval > 0 else None
    )
    core = AdapterCore(
        settings.model,
        engine,
        ChatTemplate.load(settings.chat_template),
        metrics,
        max_concurrency=settings.max_concurrency,
        default_timeout=settings.default_timeout,
        load=(lambda: sampler.current) if sampler is not None else None,
        engine_kind=settings.engine.kind,
    )
    health = HealthBoard()
    for name in ("", SERVICE_NAME, settings.model.id):
        await health.set(name, False)

    async def on_change(serving: bool) -> None:
        for name in ("", SERVICE_NAME, settings.model.id):
            await health.set(name, serving)

    async def watch() -> None:
        loops = [core.watch(settings.health_interval, on_change)]
        if sampler is not None:
            loops.append(sampler.run())
        await asyncio.gather(*loops)

    async def stop() -> None:
        if sampler is not None:
            await sampler.close()
        await engine.close()

    running = await start_server(core, metrics, health, settings.server)
    log.info(
        "adapter started",
        extra={"model": settings.model.id, "port": running.port,
               "engine": settings.engine.kind, "engine_url": settings.engine.url},
    )
    await serve_until_signalled(
        running, settings.server.grace_seconds, watch=watch(), on_stop=stop,
    )


def main() -> None:
    settings = parse_args()
    tracing.setup(f"adapter-{settings.model.id}")
    uvloop.run(run(settings))


if __name__ == "__main__":
    main()
