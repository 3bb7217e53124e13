"""An in-process backend for unit and component tests of the cores.

It implements the adapter's Engine protocol (what TGIEngine does over
HTTP), scripted per test: the text to produce, a failure to raise, a delay.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from services.adapter.engines.base import EngineInfo, EngineResult, EngineToken, Prompt
from services.adapter.tool_calls.types import ToolChoice
from services.common.errors import MeshError
from services.common.types import FinishReason, Parameters


@dataclass
class FakeBackend:
    words: list[str] = field(default_factory=lambda: ["Hello", " there", ",", " friend", "."])
    input_tokens: int = 7
    fail: MeshError | None = None
    fail_after: int | None = None  # fail mid-stream after this many tokens
    delay: float = 0.0
    healthy: bool = True
    info_reply: EngineInfo = field(
        default_factory=lambda: EngineInfo("fake/model", 1000, 2048, 4, 128)
    )
    prompts: list[Prompt] = field(default_factory=list)
    params: list[Parameters] = field(default_factory=list)
    cancelled: int = 0
    closed: bool = False
    applies_template: bool = False
    # The tool choices the engine's own chat API takes (native tool calling).
    native: frozenset[str] = frozenset()

    def native_tools(self, choice: ToolChoice) -> bool:
        return choice.mode in self.native

    def _words(self, params: Parameters) -> list[str]:
        return self.words[: params.max_new_tokens or len(self.words)]

    async def generate(
        self, prompt: Prompt, params: Parameters, timeout: float | None
    ) -> EngineResult:
        self.prompts.append(prompt)
        self.params.append(params)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        words = self._words(params)
        return EngineResult("".join(words), len(words), self.input_tokens, _finish(words, self))

    async def generate_stream(
        self, prompt: Prompt, params: Parameters, timeout: float | None
    ) -> AsyncIterator[EngineToken | EngineResult]:
        self.prompts.append(prompt)
        self.params.append(params)
        words = self._words(params)
        try:
            for i, word in enumerate(words):
                if self.fail is not None and (self.fail_after or 0) <= i:
                    raise self.fail
                if self.delay:
                    await asyncio.sleep(self.delay)
                yield EngineToken(word)
            if self.fail is not None:
                raise self.fail
            yield EngineResult("".join(words), len(words), self.input_tokens, _finish(words, self))
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise

    async def health(self, timeout: float = 2.0) -> bool:
        return self.healthy

    async def info(self, timeout: float = 2.0) -> EngineInfo:
        return self.info_reply

    async def close(self) -> None:
        self.closed = True


def _finish(words: list[str], backend: FakeBackend) -> FinishReason:
    return FinishReason.LENGTH if len(words) < len(backend.words) else FinishReason.EOS_TOKEN
