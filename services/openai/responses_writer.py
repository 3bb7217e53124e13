"""The Responses API's stream over Server-Sent Events: the chat completion
chunks the OpenAI face relays go in, `ResponseEvents`' typed events come out
(`event: <type>` + `data: <json>`, no `[DONE]`)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from services.common.errors import MeshError
from services.openai.responses_api import ResponseEvents, ResponsesRequest, encode_event
from services.openai.sse import SseWriter


class ResponsesWriter(SseWriter):
    def __init__(self, request: web.Request, translated: ResponsesRequest, model: str) -> None:
        super().__init__(request)
        self._events = ResponseEvents(translated, model)

    async def start(self) -> None:
        await super().start()
        await self._write(self._events.start())

    async def send(self, *values: Any, done: bool = False) -> None:
        events = [e for chunk in values for e in self._events.chunk(chunk)]
        if done:
            events += self._events.finish()
        await self._write(events)

    async def send_error(self, error: MeshError) -> None:
        await self._write(self._events.error(error))

    async def _write(self, events: list[dict[str, Any]]) -> None:
        if events:
            await self.response.write(b"".join(encode_event(e) for e in events))
