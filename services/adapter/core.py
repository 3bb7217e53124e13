"""The adapter's core: one model over one engine, with no transport.

It validates a request against the model's limits, renders the model's chat
template (with the tools offered, in the model family's format), calls the
engine within the caller's deadline, reads tool calls back out of the output
(services.adapter.tool_calls), counts tokens as the engine reports them, and
keeps the model's readiness in step with the engine's health.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from services.adapter.chat_template import ChatTemplate
from services.adapter.engines.base import Engine, EngineInfo, EngineResult, EngineToken, Prompt
from services.adapter.tool_calls.engine import EngineTools
from services.adapter.tool_calls.grammar import calls_grammar
from services.adapter.tool_calls.parse import StreamParser
from services.adapter.tool_calls.render import Family, family_of, hermes_messages, render
from services.adapter.tool_calls.types import ToolChoice, Turn
from services.common.errors import MeshError, Reason, clip
from services.common.metrics import Metrics
from services.common.registry import ModelSpec
from services.common.request_context import RequestContext
from services.common.types import (
    CHAT_SCENARIO,
    RAW_SCENARIO,
    Chunk,
    EngineLoad,
    FinishReason,
    Generation,
    GenerationRequest,
    Limits,
    Message,
    ModelInfo,
    Parameters,
)
from services.common.validation import require, validate
from services.tenancy.tokens import conversation_upper_bound, upper_bound

log = logging.getLogger("llmmesh.adapter")

SCENARIOS = ("", CHAT_SCENARIO, RAW_SCENARIO)
# Seconds the engine may take to count a prompt's tokens.
COUNT_TIMEOUT = 1.0


class AdapterCore:
    def __init__(
        self,
        spec: ModelSpec,
        engine: Engine,
        template: ChatTemplate,
        metrics: Metrics,
        *,
        max_concurrency: int = 128,
        default_timeout: float | None = 600.0,
        load: Callable[[], EngineLoad | None] | None = None,
        engine_kind: str = "tgi",
    ) -> None:
        self.spec = spec
        # The engine's kind: the `backend` label of llmmesh_backend_up.
        self._engine_kind = engine_kind
        self._load = load
        self._engine = engine
        self._template = template
        self._metrics = metrics
        self._max_concurrency = max_concurrency
        self._default_timeout = default_timeout
        self._in_flight = 0
        self.ready = False
        self.engine_info: EngineInfo | None = None
        # Every name the model answers to, lower-cased.
        self._names = frozenset(n.lower() for n in spec.names)
        # The limits, computed once per engine_info.
        self._limits: tuple[EngineInfo | None, Limits] = (None, spec.limits)
        # How the model writes tools and calls, from its chat template.
        self.family = family_of(template.source)
        metrics.declare_model(spec.id)

    # -- limits and readiness -------------------------------------------------

    @property
    def limits(self) -> Limits:
        """The registry's limits, narrowed by what the engine reports."""
        limits = self.spec.limits
        info = self.engine_info
        if info is None:
            return limits
        if self._limits[0] is info:
            return self._limits[1]
        max_new = limits.max_new_tokens
        if info.max_total_tokens > 1:
            max_new = min(max_new, info.max_total_tokens - 1)
        narrowed = replace(
            limits,
            max_new_tokens=max_new,
            max_stop_sequences=min(limits.max_stop_sequences, info.max_stop_sequences),
            max_input_tokens=info.max_input_tokens,
            max_total_tokens=info.max_total_tokens,
        )
        self._limits = (info, narrowed)
        return narrowed

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            id=self.spec.id,
            name=self.spec.name,
            aliases=self.spec.aliases,
            engine_model=self.engine_info.model_id if self.engine_info else "",
            limits=self.limits,
            ready=self.ready,
            replicas=1,
            ready_replicas=int(self.ready),
            load=self._load() if self._load is not None else None,
        )

    async def refresh(self) -> bool:
        """Poll the engine once; learn its limits when it (re)appears."""
        up = await self._engine.health()
        if up and (self.engine_info is None or not self.ready):
            try:
                self.engine_info = await self._engine.info()
            except MeshError:
                up = False
        if up != self.ready:
            log.info(
                "engine health changed",
                extra={"model": self.spec.id, "serving": up},
            )
        self.ready = up
        self._metrics.engine_up.labels(
            self._metrics.service, self.spec.id, self._engine_kind).set(int(up))
        return up

    async def watch(
        self, interval: float, on_change: Callable[[bool], Awaitable[None]]
    ) -> None:
        """Poll the engine forever, calling on_change(serving) on every change."""
        last: bool | None = None
        while True:
            up = await self.refresh()
            if up != last:
                await on_change(up)
                last = up
            await asyncio.sleep(interval)

    # -- the GenerationCore protocol -----------------------------------------------

    def resolve(self, model_id: str, scenario: str) -> RequestContext:
        served = not model_id or model_id.lower() in self._names
        return RequestContext(
            model=self.spec if served else None,
            # One model here: every call is counted as its own.
            model_label=self.spec.id,
            scenario=RAW_SCENARIO if scenario == RAW_SCENARIO else CHAT_SCENARIO,
        )

    async def list_models(self) -> list[ModelInfo]:
        return [self.model_info()]

    async def get_model(self, model_id: str) -> ModelInfo:
        self._check_model(model_id)
        return self.model_info()

    async def generate(
        self, request: GenerationRequest, timeout: float | None,
        context: RequestContext | None = None,
    ) -> Generation:
        prompt, params, parser = self._prepare(request, context)
        with self._slot():
            result = await self._engine.generate(prompt, params, self._deadline(timeout))
        generation = self._finish(result)
        if parser is None:
            return generation
        deltas = parser.feed(result.text) + parser.finish()
        return self._with_calls(generation, "".join(d.content for d in deltas), parser)

    async def generate_stream(
        self, request: GenerationRequest, timeout: float | None,
        context: RequestContext | None = None,
    ) -> AsyncIterator[Chunk | Generation]:
        prompt, params, parser = self._prepare(request, context)
        with self._slot():
            tokens = 0
            content: list[str] = []
            events = self._engine.generate_stream(prompt, params, self._deadline(timeout))
            try:
                async for event in events:
                    if isinstance(event, EngineToken):
                        tokens += event.count
                        if parser is None:
                            if event.text or event.logprobs or event.tool_calls:
                                yield Chunk(event.text, tokens, logprobs=event.logprobs,
                                            tool_calls=event.tool_calls)
                            continue
                        if not event.text:
                            continue
                        for delta in parser.feed(event.text):
                            content.append(delta.content)
                            yield Chunk(delta.content, tokens, tool_calls=delta.tool_calls)
                    elif parser is None:
                        yield self._finish(event)
                    else:
                        for delta in parser.finish():
                            content.append(delta.content)
                            yield Chunk(delta.content, tokens, tool_calls=delta.tool_calls)
                        yield self._with_calls(self._finish(event), "".join(content), parser)
            finally:
                await events.aclose()  # type: ignore[attr-defined]

    async def count_tokens(
        self, request: GenerationRequest, context: RequestContext | None = None
    ) -> tuple[int, bool]:
        """The input tokens of the prompt as it would be sent: the engine's
        tokenizer where it has one, else the stated upper bound."""
        prompt, _, _ = self._prepare(request, context)
        if isinstance(prompt, EngineTools):  # the engine renders tools and calls
            offered = json.dumps(prompt.fields())
            return conversation_upper_bound(
                [(m["role"], json.dumps(m)) for m in prompt.messages()] + [("system", offered)]
            ), False
        if not isinstance(prompt, str):  # the engine renders the conversation
            return conversation_upper_bound((m.role, m.content) for m in prompt), False
        count = getattr(self._engine, "count_tokens", None)
        if count is not None:
            try:
                counted = await count(prompt, COUNT_TIMEOUT)
            except MeshError as exc:
                log.warning("the engine could not count tokens; answering the bound",
                            extra={"error": exc.message})
            else:
                if counted is not None:  # None: this engine has no tokenizer route
                    return counted, True
        return upper_bound(prompt), False

    # -- helpers ------------------------------------------------------------------

    def _check_model(self, model_id: str) -> None:
        if model_id and model_id.lower() not in self._names:
            raise MeshError(
                Reason.MODEL_NOT_FOUND,
                f"model {clip(model_id)!r} is not served here; "
                f"this adapter serves {self.spec.id!r}",
                metadata={"model_id": clip(model_id), "known_models": self.spec.id},
            )

    def _prepare(
        self, request: GenerationRequest, context: RequestContext | None
    ) -> tuple[Prompt, Parameters, StreamParser | None]:
        if context is None or context.model is not self.spec:
            self._check_model(request.model_id)
        require(
            request.scenario in SCENARIOS,
            "scenario",
            f"the adapter takes only {', '.join(repr(s) for s in SCENARIOS)}; "
            "scenario templates are applied by the router",
        )
        # A last assistant message is the start of the answer, to be continued
        # (the router resumes a broken stream so): the prompt is the one the
        # answer began from, the template's open assistant turn, followed by
        # the text verbatim. An engine that applies its own template gets
        # the messages as they are.
        validate(request, self.limits, continuation=True)
        params = request.parameters.with_defaults(self.spec.defaults)
        if request.scenario == RAW_SCENARIO and not request.messages:
            return request.inputs, params, None
        messages = request.messages or (Message("user", request.inputs),)
        if not request.tools and not any(m.tool_calls or m.role == "tool" for m in messages):
            if self._engine.applies_template:
                return messages, params, None
            if messages[-1].role == "assistant":
                return self._template.render(messages[:-1]) + messages[-1].content, params, None
            return self._template.render(messages), params, None
        return self._prepare_tools(request, messages, params)

    def _prepare_tools(
        self, request: GenerationRequest, messages: tuple[Message, ...], params: Parameters
    ) -> tuple[Prompt, Parameters, StreamParser | None]:
        """A conversation with tools: rendered in the family's format, a forced
        choice enforced with a grammar, the output read by a parser."""
        choice = request.tool_choice or ToolChoice("auto" if request.tools else "none")
        offered = request.tools if choice.mode != "none" else ()
        turns = [Turn(m.role, m.content, m.tool_calls, m.tool_call_id) for m in messages]
        if self._engine.native_tools(choice):
            # The engine's own tool support: it reads the tools, makes the
            # calls, and its driver normalises them (tool_calls.engine).
            return EngineTools(tuple(turns), request.tools, choice,
                               request.parallel_tool_calls), params, None
        # Otherwise (and where the engine cannot honour this choice) the
        # mesh renders the tools, forces a choice with a grammar, and parses.
        grammar = calls_grammar(request.tools, choice)
        if grammar is not None:
            params = replace(params, grammar=grammar)
        # An engine that applies its own template gets the calls and results
        # as plain messages in the generic (Hermes) markup.
        family = Family.GENERIC if self._engine.applies_template else self.family
        prompt: Prompt
        if self._engine.applies_template:
            prompt = tuple(hermes_messages(turns, offered))
        else:
            prompt = render(family, turns, offered, self._template.render)
        malformed = self._metrics.tool_call_malformed.labels(
            self._metrics.service, self.spec.id, family.value)

        def on_malformed(why: str) -> None:
            malformed.inc()
            log.warning("malformed tool call returned as content",
                        extra={"model": self.spec.id, "family": family.value, "why": why})

        parser = StreamParser(family, request.tools, choice, on_malformed,
                              parallel=request.parallel_tool_calls)
        return prompt, params, parser

    def _with_calls(
        self, generation: Generation, content: str, parser: StreamParser
    ) -> Generation:
        calls = parser.tool_calls
        if not calls:
            return replace(generation, text=content)
        # A call cut short by the token limit ends with `length`, as OpenAI's do.
        finish = (generation.finish_reason if generation.finish_reason is FinishReason.LENGTH
                  else FinishReason.TOOL_CALLS)
        return replace(generation, text=content, tool_calls=calls, finish_reason=finish)

    def _deadline(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self._default_timeout

    def _slot(self) -> _Slot:
        if self._in_flight >= self._max_concurrency:
            raise MeshError(
                Reason.OVERLOADED,
                f"model {self.spec.id} is at its limit of {self._max_concurrency} "
                "concurrent requests; retry shortly",
                metadata={"model_id": self.spec.id, "limit": str(self._max_concurrency)},
                retry_after=1.0,
            )
        return _Slot(self)

    def _finish(self, result: EngineResult) -> Generation:
        self._metrics.record_tokens(self.spec.id, result.input_tokens, result.generated_tokens)
        return Generation(
            text=result.text,
            model=self.spec.name,
            model_id=self.spec.id,
            tokens=result.generated_tokens,
            input_tokens=result.input_tokens,
            finish_reason=result.finish_reason,
            logprobs=result.logprobs,
            cached_input_tokens=result.cached_input_tokens,
            tool_calls=result.tool_calls,
        )


class _Slot:
    """One of the adapter's concurrent requests, while entered."""

    __slots__ = ("core",)

    def __init__(self, core: AdapterCore) -> None:
        self.core = core

    def __enter__(self) -> None:
        self.core._in_flight += 1

    def __exit__(self, *exc: object) -> None:
        self.core._in_flight -= 1
