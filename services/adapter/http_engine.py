"""What every HTTP engine driver shares: reading an error body that may not
be JSON, and turning a transport failure into the error table's reason."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from services.common.errors import MeshError, Reason


async def json_or_text(resp: aiohttp.ClientResponse) -> Any:
    raw = await resp.read()
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", errors="replace")


def transport_error(exc: BaseException, url: str, api: str) -> MeshError:
    """The reason for a failure to talk to the engine at `url`, whose API is `api`
    ("TGI", "OpenAI")."""
    meta = {"backend": url}
    if isinstance(exc, TimeoutError):
        return MeshError(Reason.TIMEOUT, f"the engine at {url} did not answer in time",
                         metadata=meta)
    if isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError):
        return MeshError(Reason.BACKEND_UNAVAILABLE, f"cannot connect to the engine at {url}",
                         metadata=meta)
    if isinstance(
        exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError | ConnectionError
    ):
        return MeshError(Reason.INCOMPLETE_GENERATION,
                         f"the engine at {url} dropped the connection", metadata=meta)
    if isinstance(exc, ValueError | KeyError | TypeError):
        return MeshError(Reason.MODEL_ERROR,
                         f"the engine at {url} sent a reply that is not {api}'s", metadata=meta)
    return MeshError(Reason.BACKEND_UNAVAILABLE,
                     f"the engine at {url} failed: {exc.__class__.__name__}", metadata=meta)
