"""The TGI double's counters across a reset: a generation that outlives the
reset (a test's client left it running) must not stay counted as active."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.cpu_backend.settings import ServerSettings
from tools.tgi_double import ScriptedEngine, create_double_app

pytestmark = pytest.mark.timeout(30)

SETTINGS = ServerSettings(model_id="test-model", max_input_tokens=1000, max_total_tokens=1100)


async def active(client: TestClient) -> int:
    resp = await client.get("/_stats")
    return int((await resp.json())["generations_active"])


async def test_a_generation_that_outlives_a_reset_is_not_left_active() -> None:
    app = create_double_app(ScriptedEngine(model_id="scripted"), SETTINGS)
    async with TestServer(app) as server, TestClient(server) as client:
        await client.post("/_control", json={"token_delay": 0.2})
        body = {"inputs": " ".join(["w"] * 50), "parameters": {"max_new_tokens": 50}}
        resp = await client.post("/generate_stream", json=body)
        assert resp.status == 200
        await resp.content.readline()  # the first event: generating
        assert await active(client) == 1
        await client.post("/_reset")
        assert await active(client) == 1  # still running, still counted
        resp.close()  # the client leaves: the generation is cancelled
        for _ in range(50):
            if await active(client) == 0:
                break
            await asyncio.sleep(0.05)
        assert await active(client) == 0
