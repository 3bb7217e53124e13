"""TGI's error table: every error the CPU backend answers, with its status.

Behaviour follows TGI's router (router/src/server.rs `From<InferError>`):
one kind per row, carrying the HTTP status, the body's `error_type` and the
label of `tgi_request_failure{err=...}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class ErrorSpec:
    """One row of TGI's error table."""

    status: int
    error_type: str
    # Label of tgi_request_failure{err=...}.
    metric_label: str


# The single error table: InferError kind -> HTTP status, body error_type and
# failure-metric label (router/src/server.rs `From<InferError>`).
ERRORS: Final[Mapping[str, ErrorSpec]] = {
    "validation": ErrorSpec(422, "validation", "validation"),
    "overloaded": ErrorSpec(429, "overloaded", "overloaded"),
    "generation": ErrorSpec(424, "generation", "generation"),
    "incomplete_generation": ErrorSpec(500, "incomplete_generation", "incomplete"),
}


class InferError(Exception):
    """An error TGI reports as `{"error": message, "error_type": ...}`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.spec = ERRORS[kind]

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.spec.error_type}

    @classmethod
    def validation(cls, detail: str) -> InferError:
        return cls("validation", f"Input validation error: {detail}")

    @classmethod
    def overloaded(cls) -> InferError:
        return cls("overloaded", "Model is overloaded")

    @classmethod
    def generation(cls, detail: str) -> InferError:
        return cls("generation", f"Request failed during generation: {detail}")

    @classmethod
    def incomplete(cls, *, stream: bool) -> InferError:
        message = "Incomplete generation stream" if stream else "Incomplete generation"
        return cls("incomplete_generation", message)


class BodyError(Exception):
    """The body could not be read as a request at all (axum extractor rejection)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict[str, str]:
        # axum sends plain text without an error_type; "validation" lets the
        # text-generation client map these to ValidationError like a 422.
        return {"error": self.message, "error_type": "validation"}


