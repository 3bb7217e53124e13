"""The kinds of engine an adapter can drive: one entry per kind, read by the
registry loader, the adapter (which picks its driver by `api`), the
launcher and `--help`.

An engine kind speaks one of two APIs: TGI's own (`tgi`), or OpenAI's
(`openai`: `/v1/completions`, `/v1/chat/completions`, `/v1/models`). The
OpenAI-compatible servers differ in what they accept beyond OpenAI's
fields; `spellings` says how a kind names a generation parameter that
OpenAI's API leaves out (services.common.parameters names each parameter's
OpenAI spelling, and whether TGI takes it), and `None` refuses it with a
field violation instead of dropping it in silence. Adding a kind of
OpenAI-compatible server is one entry here; a new API is one driver in
services/adapter/engines/ and one entry here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Api = Literal["tgi", "openai"]


@dataclass(frozen=True)
class EngineKind:
    """One kind of engine: its API and how it spells what that API leaves out."""

    name: str
    api: Api
    # What `--help` says about it.
    description: str
    # Parameter name (services.common.parameters) -> the request field this
    # kind uses for it, or None when it has none (the parameter is refused).
    # A parameter not listed keeps its API's spelling.
    spellings: Mapping[str, str | None] = field(default_factory=dict)
    # How a JSON-schema grammar is sent: "response_format" (OpenAI's
    # json_schema response format), "gbnf" (converted to a llama.cpp GBNF
    # grammar, sent as `grammar`), "tgi" (TGI's `grammar`), or None.
    json_grammar: str | None = "response_format"
    # How a regex grammar is sent: "structured_outputs" (vLLM), "regex"
    # (SGLang), "tgi", or None when the engine cannot constrain to a regex.
    regex_grammar: str | None = None
    # Whether the engine serves Prometheus metrics at /metrics.
    metrics: bool = True
    # Whether a conversation ending in an assistant message (a stream resumed
    # after its text so far) must say so, as vLLM's chat API wants:
    # `continue_final_message: true` with `add_generation_prompt: false`;
    # without them the engine's template closes that turn and opens another.
    continue_final_message: bool = False
    # The tool choices (`none`, `auto`, `required`, `named`) the engine's own
    # chat API honours, for `chat_api: engine`: a request with another choice
    # (or with tools at all, when empty) falls back to the mesh's rendering,
    # grammar and parser. `tool_choice_field` False: the engine takes `tools`
    # but not `tool_choice` (it always chooses for itself).
    tool_choices: frozenset[str] = frozenset({"none", "auto", "required", "named"})
    tool_choice_field: bool = True

    @property
    def url_hint(self) -> str:
        return "http://HOST:PORT" if self.api == "tgi" else "http://HOST:PORT/v1"


# OpenAI's API has neither top_k nor a multiplicative repetition penalty.
_NO_EXTRAS: Mapping[str, str | None] = {"top_k": None, "repetition_penalty": None}

KINDS: Mapping[str, EngineKind] = {
    kind.name: kind
    for kind in (
        EngineKind("tgi", "tgi", "Text Generation Inference's own API (or the CPU backend)",
                   json_grammar="tgi", regex_grammar="tgi", tool_choices=frozenset()),
        # Only OpenAI's own fields: any server that implements the API.
        EngineKind("openai", "openai", "any OpenAI-compatible server", _NO_EXTRAS),
        # vLLM's extra sampling parameters and structured outputs
        # (vllm/entrypoints/openai/protocol.py: CompletionRequest).
        EngineKind("vllm", "openai", "vLLM's OpenAI-compatible server",
                   regex_grammar="structured_outputs", continue_final_message=True),
        # SGLang (python/sglang/srt/entrypoints/openai/protocol.py).
        EngineKind("sglang", "openai", "SGLang's OpenAI-compatible server",
                   regex_grammar="regex"),
        # llama.cpp's llama-server and llama-cpp-python's server:
        # `repeat_penalty`, a GBNF `grammar` on both routes (llama-cpp-python's
        # /v1/completions has no other way to constrain output), no regex;
        # /metrics only from a llama-server started with --metrics.
        # llama-cpp-python's chatml-function-calling format takes `auto` and
        # a named function, not `required`.
        EngineKind("llamacpp", "openai", "llama.cpp's llama-server or llama-cpp-python",
                   {"repetition_penalty": "repeat_penalty"}, json_grammar="gbnf",
                   tool_choices=frozenset({"none", "auto", "named"})),
        # Ollama's OpenAI compatibility layer: OpenAI's fields only, no
        # structured output on /v1/completions, and no logprobs; `tools`
        # but no `tool_choice` (the model always chooses for itself).
        EngineKind("ollama", "openai", "Ollama's OpenAI compatibility layer",
                   {**_NO_EXTRAS, "logprobs": None, "top_logprobs": None},
                   json_grammar=None, metrics=False,
                   tool_choices=frozenset({"none", "auto"}), tool_choice_field=False),
    )
}

# The kinds' names, TGI first (the default).
NAMES: tuple[str, ...] = tuple(KINDS)


def describe() -> str:
    """Every kind and what it is, for `--help`."""
    return "; ".join(f"{k.name}: {k.description} at {k.url_hint}" for k in KINDS.values())
