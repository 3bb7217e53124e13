"""The local mesh as `make up` starts it (CPU backends: llama.cpp + SmolLM2),
under a crowd and with structured output, spoken to through Envoy's HTTP API.

Every limit on the path (Envoy, the router's per-model in-flight bound, the
adapter's concurrency bound, the CPU backend's queue) must let 40 concurrent
requests for ONE model wait their turn: all answered, none refused. A JSON
schema sent through the mesh comes back as JSON that conforms to it.
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness.mesh import free_run, launch, stop_launcher
from tests.harness.procs import free_port

pytest.importorskip("llama_cpp", reason="make test installs llama-cpp-python")
jsonschema = pytest.importorskip("jsonschema")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

CROWD = 40


@pytest.fixture(scope="module")
def edge() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="llmmesh-cpu-load-") as tmp:
        envoy: list[int] = []

        def args() -> list[str]:
            envoy[:] = [free_port()]
            return [
                "--run-dir", f"{tmp}/run", "--envoy-port", str(envoy[0]),
                "--admin-port", str(free_port()), "--router-port", str(free_port()),
                "--adapter-port", str(free_run(2)), "--backend-port", str(free_run(2)),
                "--metrics-port", str(free_run(3)), "--openai-port", str(free_port()),
                "--no-prometheus",
            ]

        launcher = launch(Path(tmp) / "launcher.log", args, 240)
        try:
            yield f"http://127.0.0.1:{envoy[0]}"
        finally:
            stop_launcher(launcher)


async def _generate(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with session.post(url + "/v1/generate", json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_forty_concurrent_requests_are_all_answered(edge: str) -> None:
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        bodies = [
            {"model_id": "qwen2", "inputs": f"Tell me fact number {i} about the sea.",
             "parameters": {"max_new_tokens": 16}}
            for i in range(CROWD)
        ]  # fmt: skip
        results = await asyncio.gather(*(_generate(session, edge, b) for b in bodies))
    statuses = [status for status, _ in results]
    assert statuses == [200] * CROWD, [r for r in results if r[0] != 200][:3]
    assert all(body["tokens"] >= 1 and body["generated_text"] for _, body in results)


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


async def test_json_schema_answer_through_the_mesh(edge: str) -> None:
    body = {
        "model_id": "llama3",
        "inputs": "Give me a person called Bo, aged 30, as JSON.",
        "parameters": {"max_new_tokens": 64, "grammar": {"json_schema": PERSON}},
    }
    async with aiohttp.ClientSession() as session:
        status, reply = await _generate(session, edge, body)
    assert status == 200, reply
    jsonschema.validate(json.loads(reply["generated_text"]), PERSON)


async def test_regex_answer_through_the_mesh(edge: str) -> None:
    pattern = r"(red|green|blue)"
    body = {
        "model_id": "qwen2",
        "inputs": "Name a colour.",
        "parameters": {"max_new_tokens": 8, "grammar": {"regex": pattern}},
    }
    async with aiohttp.ClientSession() as session:
        status, reply = await _generate(session, edge, body)
    assert status == 200, reply
    assert re.fullmatch(pattern, reply["generated_text"])
