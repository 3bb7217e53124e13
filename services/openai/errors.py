"""MeshError -> OpenAI's error JSON, HTTP status and retry headers.

The status comes from the mesh's one error table (services.common.errors:
reason -> gRPC code -> HTTP status), so an error has the same status on the
native and the OpenAI API. OpenAI's SDKs pick their exception class from the
status alone; `type`, `code` (the reason's metric label) and `param` are for
people. `x-should-retry` carries the table's verdict on retrying.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from services.common.errors import MeshError, Reason
from services.openai.requests import OpenAIRequest, openai_error

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    499: "request_cancelled",
}


def error_type(status: int) -> str:
    """OpenAI's `type` for an HTTP status."""
    return TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


@dataclass(frozen=True)
class ErrorReply:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]


def error_object(error: MeshError, request: OpenAIRequest | None = None) -> dict[str, Any]:
    """The inner `error` object: message, type, param, code."""
    status = error.http_status
    message, param = openai_error(error, request)
    if error.reason is Reason.MODEL_NOT_FOUND:
        param = "model"
    return {
        "message": message,
        "type": error_type(status),
        "param": param,
        "code": error.reason.label,
    }


def error_reply(error: MeshError, request: OpenAIRequest | None = None) -> ErrorReply:
    headers = {**error.headers, "x-should-retry": "true" if error.retryable else "false"}
    if error.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(error.retry_after)))
        headers["retry-after-ms"] = str(int(error.retry_after * 1000))
    return ErrorReply(error.http_status, headers, {"error": error_object(error, request)})
