"""The CPU backend's access log (the TGI double's too, which serves the same
app): probes and scrapes that succeed stay out of the info level, so logs
show requests; a probe that fails is still news."""

from __future__ import annotations

import logging

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.cpu_backend.settings import ServerSettings
from tools.tgi_double import ScriptedEngine, create_double_app

pytestmark = pytest.mark.timeout(30)

ACCESS = "llmmesh.cpu_backend.access"


def access_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str, int]]:
    return [(r.levelno, r.fields["path"], r.fields["status"])  # type: ignore[attr-defined]
            for r in caplog.records if r.name == ACCESS]


async def test_successful_probes_log_at_debug_and_requests_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=ACCESS)
    app = create_double_app(ScriptedEngine(model_id="m"), ServerSettings(model_id="m"))
    async with TestServer(app) as server, TestClient(server) as client:
        for path in ("/health", "/ping", "/", "/metrics", "/info"):
            assert (await client.get(path)).status == 200
        assert (await client.post("/generate", json={"inputs": "hi there"})).status == 200
        await client.post("/_control", json={"mode": "unhealthy"})
        assert (await client.get("/health")).status == 503
    lines = access_lines(caplog)
    assert (logging.DEBUG, "/health", 200) in lines
    assert (logging.DEBUG, "/ping", 200) in lines
    assert (logging.DEBUG, "/", 200) in lines
    assert (logging.DEBUG, "/metrics", 200) in lines
    assert (logging.INFO, "/info", 200) in lines
    assert (logging.INFO, "/generate", 200) in lines
    assert (logging.INFO, "/health", 503) in lines
