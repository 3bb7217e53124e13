"""The failures tenancy adds, with the rows they take in the mesh's error table.

Each reason here is a row of the one error table (services.common.errors):
its gRPC code and whether a retry may help, in the table's own `ErrorKind`.
`TenancyError` has the attributes a `MeshError` has (reason, message,
metadata, retry_after, code, retryable, http_status), so the layers that
turn a MeshError into a gRPC status or an OpenAI reply read either one.
Failures that already have a reason (a key of no tenant, an unknown
priority, a full queue) are raised as MeshError with that reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from services.common.errors import HTTP_STATUS, ErrorKind


class TenancyReason(StrEnum):
    """Why tenancy refused a request; UPPER_SNAKE as in google.rpc.ErrorInfo."""

    # The tenant's budget has no room now; RetryInfo says when it will.
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    # The request alone is larger than one of the tenant's limits.
    QUOTA_NEVER_FITS = "QUOTA_NEVER_FITS"
    # The request waited in the model's admission queue for its whole timeout.
    QUEUE_TIMEOUT = "QUEUE_TIMEOUT"
    # The tenant may not use this model.
    MODEL_NOT_ALLOWED = "MODEL_NOT_ALLOWED"
    # The shared quota store cannot be reached and the policy is fail-closed.
    QUOTA_STORE_UNAVAILABLE = "QUOTA_STORE_UNAVAILABLE"
    # Only an admin tenant's key may do this (read every tenant's usage).
    ADMIN_ONLY = "ADMIN_ONLY"

    @property
    def label(self) -> str:
        """The value of the `reason` label on metrics."""
        return self.value.lower()


# The rows these reasons take in services.common.errors.TABLE.
ROWS: Mapping[TenancyReason, ErrorKind] = {
    TenancyReason.QUOTA_EXCEEDED: ErrorKind("RESOURCE_EXHAUSTED", retryable=True),
    TenancyReason.QUOTA_NEVER_FITS: ErrorKind("RESOURCE_EXHAUSTED", retryable=False),
    TenancyReason.QUEUE_TIMEOUT: ErrorKind("RESOURCE_EXHAUSTED", retryable=True),
    TenancyReason.MODEL_NOT_ALLOWED: ErrorKind("PERMISSION_DENIED", retryable=False),
    TenancyReason.QUOTA_STORE_UNAVAILABLE: ErrorKind("UNAVAILABLE", retryable=True),
    TenancyReason.ADMIN_ONLY: ErrorKind("PERMISSION_DENIED", retryable=False),
}


class TenancyError(Exception):
    """A refusal with a reason from ROWS and everything a client needs."""

    def __init__(
        self,
        reason: TenancyReason,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.retry_after = retry_after
        self.violations = ()

    @property
    def code(self) -> str:
        """The gRPC status code name for this error."""
        return ROWS[self.reason].code

    @property
    def retryable(self) -> bool:
        return ROWS[self.reason].retryable

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def __repr__(self) -> str:
        return f"TenancyError({self.reason.value}, {self.message!r})"
