"""Server-Sent Events as OpenAI streams them: `data: {json}` and a blank
line per event, `data: [DONE]` at the end, every write flushed at once."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from services.common.errors import MeshError
from services.openai.errors import error_reply

DONE = b"data: [DONE]\n\n"


def event(value: Any) -> bytes:
    return b"data: " + json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8"
    ) + b"\n\n"


class SseWriter:
    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                # Proxies that buffer by default (nginx) pass events on at once.
                "X-Accel-Buffering": "no",
            },
        )

    async def start(self) -> None:
        await self.response.prepare(self._request)

    async def send(self, *values: Any, done: bool = False) -> None:
        """Write events (several in one write), and `[DONE]` after them if `done`."""
        data = b"".join(event(v) for v in values)
        await self.response.write(data + DONE if done else data)

    async def send_error(self, error: MeshError) -> None:
        """An error after the 200: the stream's last event, which the SDKs raise."""
        await self.send(error_reply(error).body)
