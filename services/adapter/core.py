"""The adapter's core: one model over one engine, with no transport.

It validates a request against the model's limits, renders the model's chat
template, calls the engine within the caller's deadline, counts tokens as
the engine reports them, and keeps the model's readiness in step with the
engine's health.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from services.adapter.chat_template import ChatTemplate
from services.adapter.engines.base import Engine, EngineInfo, EngineResult, EngineToken, Prompt
from services.common.errors import MeshError, Reason, clip
from services.common.metrics import Metrics
from services.common.registry import ModelSpec
from services.common.request_context import RequestContext
from services.common.types import (
    CHAT_SCENARIO,
    RAW_SCENARIO,
    Chunk,
    EngineLoad,
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
        prompt, params = self._prepare(request, context)
        with self._slot():
            result = await self._engine.generate(prompt, params, self._deadline(timeout))
        return self._finish(result)

    async def generate_stream(
        self, request: GenerationRequest, timeout: float | None,
        context: RequestContext | None = None,
    ) -> AsyncIterator[Chunk | Generation]:
        prompt, params = self._prepare(request, context)
        with self._slot():
            tokens = 0
            events = self._engine.generate_stream(prompt, params, self._deadline(timeout))
            try:
                async for event in events:
                    if isinstance(event, EngineToken):
                        tokens += event.count
                        if event.text or event.logprobs:
                            yield Chunk(event.text, tokens, event.logprobs)
                    else:
                        yield self._finish(event)
            finally:
                await events.aclose()  # type: ignore[attr-defined]

    async def count_tokens(
        self, request: GenerationRequest, context: RequestContext | None = None
    ) -> tuple[int, bool]:
        """The input tokens of the prompt as it would be sent: the engine's
        tokenizer where it has one, else the stated upper bound."""
        prompt, _ = self._prepare(request, context)
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
    ) -> tuple[Prompt, Parameters]:
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
            return request.inputs, params
        messages = request.messages or (Message("user", request.inputs),)
        if self._engine.applies_template:
            return messages, params
        if messages[-1].role == "assistant":
            return self._template.render(messages[:-1]) + messages[-1].content, params
        return self._template.render(messages), params

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
