"""Run one adapter: `python -m services.adapter --model qwen2 --tgi-url URL`.

Every flag can also come from the environment (LLMMESH_MODEL, TGI_URL, ...,
as shown below), which is how the containers are configured.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import uvloop

from services.adapter.chat_template import ChatTemplate
from services.adapter.core import AdapterCore
from services.adapter.tgi import TGIBackend
from services.common import envflags, logs
from services.common.metrics import Metrics
from services.common.registry import ModelSpec, load_registry
from services.common.service import (
    SERVICE_NAME,
    HealthBoard,
    ServerSettings,
    add_server_arguments,
    serve_until_signalled,
    server_settings,
    start_server,
)

log = logging.getLogger("llmmesh.adapter")


@dataclass(frozen=True)
class AdapterSettings:
    model: ModelSpec
    tgi_url: str
    chat_template: Path
    server: ServerSettings
    max_concurrency: int
    default_timeout: float
    health_interval: float


def parse_args(argv: list[str] | None = None) -> AdapterSettings:
    env = os.environ
    p = argparse.ArgumentParser(prog="python -m services.adapter", description=__doc__)
    add_server_arguments(p, default_port=50061)
    p.add_argument("--model", default=None, help="registry id, e.g. qwen2")
    p.add_argument("--tgi-url", default=None, help="the TGI server's base URL")
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
                   help="seconds between health checks of the TGI server")
    envflags.apply(p, env, names={"tgi_url": "TGI_URL"})
    args = p.parse_args(argv)
    if not args.model:
        p.error("--model (or LLMMESH_MODEL) is required")
    if not args.tgi_url:
        p.error("--tgi-url (or TGI_URL) is required")
    logs.setup(f"adapter-{args.model}", args.log_level)
    registry = load_registry(args.registry)
    model = registry.find(args.model)
    if model is None:
        known = ", ".join(m.id for m in registry.models)
        p.error(f"model {args.model!r} is not in {args.registry} (known: {known})")
    template = args.chat_template or model.chat_template
    if template is None:
        p.error(f"no chat template for {model.id}: set --chat-template")
    return AdapterSettings(
        model=model,
        tgi_url=args.tgi_url,
        chat_template=Path(template),
        server=server_settings(args),
        max_concurrency=args.max_concurrency,
        default_timeout=args.timeout,
        health_interval=args.health_interval,
    )


async def run(settings: AdapterSettings) -> None:
    metrics = Metrics(f"adapter-{settings.model.id}")
    backend = TGIBackend(settings.tgi_url)
    core = AdapterCore(
        settings.model,
        backend,
        ChatTemplate.load(settings.chat_template),
        metrics,
        max_concurrency=settings.max_concurrency,
        default_timeout=settings.default_timeout,
    )
    health = HealthBoard()
    for name in ("", SERVICE_NAME, settings.model.id):
        await health.set(name, False)

    async def on_change(serving: bool) -> None:
        for name in ("", SERVICE_NAME, settings.model.id):
            await health.set(name, serving)

    running = await start_server(core, metrics, health, settings.server)
    log.info(
        "adapter started",
        extra={"model": settings.model.id, "port": running.port, "tgi_url": settings.tgi_url},
    )
    await serve_until_signalled(
        running, settings.server.grace_seconds,
        watch=core.watch(settings.health_interval, on_change), on_stop=backend.close,
    )


def main() -> None:
    settings = parse_args()
    uvloop.run(run(settings))


if __name__ == "__main__":
    main()
