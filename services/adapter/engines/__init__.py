"""The engines an adapter drives: the `Engine` protocol (`base`), the HTTP
layer the drivers share (`http`: session, timeouts, SSE, transport errors),
and one driver per API: `tgi` (Text Generation Inference) and
`openai_compatible` (vLLM, SGLang, llama.cpp, Ollama, any OpenAI server).

Which kinds exist, and how each spells what its API leaves out, is
services.common.engine_kinds; `make_engine` picks the driver by the kind's API.
"""

from __future__ import annotations

from services.adapter.engines.base import Engine
from services.adapter.engines.openai_compatible import OpenAICompatibleEngine, root_of
from services.adapter.engines.tgi import TGIEngine
from services.common.engine_kinds import KINDS


def make_engine(
    kind: str,
    url: str,
    *,
    served_model: str | None = None,
    chat_api: bool = False,
    api_key: str | None = None,
) -> tuple[Engine, str | None]:
    """The driver for an engine of `kind` at `url`, and the URL of the
    engine's Prometheus metrics (None: it serves none)."""
    spec = KINDS[kind]
    if spec.api == "tgi":
        tgi = TGIEngine(url)
        return tgi, f"{tgi.base_url}/metrics" if spec.metrics else None
    engine = OpenAICompatibleEngine(
        url, kind=spec, served_model=served_model, chat_api=chat_api, api_key=api_key,
    )
    return engine, f"{root_of(engine.base_url)}/metrics" if spec.metrics else None


__all__ = ["Engine", "OpenAICompatibleEngine", "TGIEngine", "make_engine"]
