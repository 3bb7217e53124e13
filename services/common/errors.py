"""The mesh's one error table.

Every failure is a `MeshError` with a `Reason`. The reason decides the gRPC
status code (Envoy derives the HTTP status from that code), is sent as the
`google.rpc.ErrorInfo` reason, and labels the error metric. Nothing else maps
errors to codes: the gRPC layer, the HTTP edge and the metrics all read this
table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

DOMAIN = "llmmesh.v1"


class Reason(StrEnum):
    """Why a request failed; UPPER_SNAKE as in google.rpc.ErrorInfo."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    OVERLOADED = "OVERLOADED"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    MODEL_ERROR = "MODEL_ERROR"
    INCOMPLETE_GENERATION = "INCOMPLETE_GENERATION"
    BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"
    MODEL_UNAVAILABLE = "MODEL_UNAVAILABLE"
    INTERNAL = "INTERNAL"
    # Tenancy (services.tenancy): the tenant's budget has no room now (RetryInfo
    # says when it will); the request alone is larger than a limit; it waited in
    # the model's queue for its whole timeout; the tenant may not use the model;
    # only an admin key may do this; the shared quota store cannot be reached.
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    QUOTA_NEVER_FITS = "QUOTA_NEVER_FITS"
    QUEUE_TIMEOUT = "QUEUE_TIMEOUT"
    MODEL_NOT_ALLOWED = "MODEL_NOT_ALLOWED"
    ADMIN_ONLY = "ADMIN_ONLY"
    QUOTA_STORE_UNAVAILABLE = "QUOTA_STORE_UNAVAILABLE"
    # Made by Envoy itself, before a request reaches the router (EDGE_ERRORS).
    ROUTE_NOT_FOUND = "ROUTE_NOT_FOUND"
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
    ROUTER_UNAVAILABLE = "ROUTER_UNAVAILABLE"

    @property
    def label(self) -> str:
        """The value of the `reason` label on error metrics."""
        return self.value.lower()


@dataclass(frozen=True)
class ErrorKind:
    """One row of the table: the gRPC code name and whether a retry may help."""

    code: str
    retryable: bool


# Reason -> gRPC status code (by name, so the core needs no grpc import).
# Envoy turns the code into HTTP: INVALID_ARGUMENT 400, NOT_FOUND 404,
# UNAUTHENTICATED 401, PERMISSION_DENIED 403, RESOURCE_EXHAUSTED 429, CANCELLED 499, INTERNAL 500,
# UNAVAILABLE 503, DEADLINE_EXCEEDED 504.
TABLE: Mapping[Reason, ErrorKind] = {
    Reason.INVALID_ARGUMENT: ErrorKind("INVALID_ARGUMENT", retryable=False),
    Reason.MODEL_NOT_FOUND: ErrorKind("NOT_FOUND", retryable=False),
    Reason.UNAUTHENTICATED: ErrorKind("UNAUTHENTICATED", retryable=False),
    Reason.OVERLOADED: ErrorKind("RESOURCE_EXHAUSTED", retryable=True),
    Reason.TIMEOUT: ErrorKind("DEADLINE_EXCEEDED", retryable=False),
    Reason.CANCELLED: ErrorKind("CANCELLED", retryable=False),
    Reason.MODEL_ERROR: ErrorKind("INTERNAL", retryable=False),
    Reason.INCOMPLETE_GENERATION: ErrorKind("UNAVAILABLE", retryable=True),
    Reason.BACKEND_UNAVAILABLE: ErrorKind("UNAVAILABLE", retryable=True),
    Reason.MODEL_UNAVAILABLE: ErrorKind("UNAVAILABLE", retryable=True),
    Reason.INTERNAL: ErrorKind("INTERNAL", retryable=False),
    Reason.QUOTA_EXCEEDED: ErrorKind("RESOURCE_EXHAUSTED", retryable=True),
    Reason.QUOTA_NEVER_FITS: ErrorKind("RESOURCE_EXHAUSTED", retryable=False),
    Reason.QUEUE_TIMEOUT: ErrorKind("RESOURCE_EXHAUSTED", retryable=True),
    Reason.MODEL_NOT_ALLOWED: ErrorKind("PERMISSION_DENIED", retryable=False),
    Reason.ADMIN_ONLY: ErrorKind("PERMISSION_DENIED", retryable=False),
    Reason.QUOTA_STORE_UNAVAILABLE: ErrorKind("UNAVAILABLE", retryable=True),
    Reason.ROUTE_NOT_FOUND: ErrorKind("NOT_FOUND", retryable=False),
    Reason.REQUEST_TOO_LARGE: ErrorKind("RESOURCE_EXHAUSTED", retryable=False),
    Reason.ROUTER_UNAVAILABLE: ErrorKind("UNAVAILABLE", retryable=True),
}


@dataclass(frozen=True)
class EdgeError:
    """An error Envoy makes itself: the reason, and the message, in which
    Envoy's command operators stand for what Envoy knows (%LOCAL_REPLY_BODY%
    is its own text, %REQ(:PATH)% the path asked for)."""

    reason: Reason
    message: str
    metadata: Mapping[str, str] | None = None
    retry_after: float | None = None


# Envoy's own replies, by the HTTP status Envoy answers with. envoy/render.py
# turns each row into a local-reply mapper that writes the body every other
# error has: {"code", "message", "details": [ErrorInfo]}, the code being the
# reason's. The HTTP status stays Envoy's (413 has no gRPC code of its own).
EDGE_ERRORS: Mapping[int, EdgeError] = {
    # A body that is not JSON, or not the method's message (a wrong type).
    400: EdgeError(Reason.INVALID_ARGUMENT, "invalid request body: %LOCAL_REPLY_BODY%"),
    404: EdgeError(
        Reason.ROUTE_NOT_FOUND,
        "no such route: %REQ(:METHOD)% %REQ(:PATH):64%",
        {"method": "%REQ(:METHOD)%", "path": "%REQ(:PATH):64%"},
    ),
    413: EdgeError(
        Reason.REQUEST_TOO_LARGE,
        "request body larger than 1 MiB (1048576 bytes)",
        {"limit_bytes": "1048576"},
    ),
    429: EdgeError(Reason.OVERLOADED, "too many requests: %LOCAL_REPLY_BODY%"),
    431: EdgeError(Reason.REQUEST_TOO_LARGE, "request headers too large: %LOCAL_REPLY_BODY%"),
    503: EdgeError(
        Reason.ROUTER_UNAVAILABLE, "the router cannot be reached: %LOCAL_REPLY_BODY%"
    ),
    504: EdgeError(Reason.TIMEOUT, "deadline exceeded: %LOCAL_REPLY_BODY%"),
}
# Envoy's refusals by response flag, answered with the reason's own status
# whatever status Envoy chose (the row comes before EDGE_ERRORS' rows): UO,
# the router cluster's circuit breaker full (more requests in flight than the
# router admits, envoy.template.yaml's EDGE_MAX_REQUESTS). A gRPC client gets
# RESOURCE_EXHAUSTED with ErrorInfo and RetryInfo, as from the router's bound.
EDGE_FLAGS: Mapping[str, EdgeError] = {
    "UO": EdgeError(
        Reason.OVERLOADED,
        "the mesh has as many requests in flight as it relays; retry shortly",
        retry_after=1.0,
    ),
}
# Any other status Envoy makes itself.
EDGE_DEFAULT = EdgeError(Reason.INTERNAL, "the edge proxy failed: %LOCAL_REPLY_BODY%")

# The HTTP status each gRPC code stands for: the mapping Envoy's transcoder
# applies to the native API, and the one the OpenAI-compatible face answers
# with itself, so an error has one status whichever API it leaves by.
HTTP_STATUS: Mapping[str, int] = {
    "INVALID_ARGUMENT": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
# Reasons whose HTTP status is not their gRPC code's (413 has no gRPC code).
HTTP_STATUS_OF_REASON: Mapping[Reason, int] = {Reason.REQUEST_TOO_LARGE: 413}

# The reverse direction, for a status that arrives without an ErrorInfo
# (from a peer that is not part of the mesh, or from gRPC itself).
CODE_FALLBACK: Mapping[str, Reason] = {
    "INVALID_ARGUMENT": Reason.INVALID_ARGUMENT,
    "OUT_OF_RANGE": Reason.INVALID_ARGUMENT,
    "NOT_FOUND": Reason.MODEL_NOT_FOUND,
    "UNAUTHENTICATED": Reason.UNAUTHENTICATED,
    "PERMISSION_DENIED": Reason.MODEL_NOT_ALLOWED,
    "RESOURCE_EXHAUSTED": Reason.OVERLOADED,
    "DEADLINE_EXCEEDED": Reason.TIMEOUT,
    "CANCELLED": Reason.CANCELLED,
    "UNAVAILABLE": Reason.BACKEND_UNAVAILABLE,
}


def clip(value: str, limit: int = 64) -> str:
    """A value the client sent, cut to `limit` characters for an error message.

    Errors travel in HTTP/2 trailers, which gRPC clients refuse beyond 8 KiB:
    an unknown model id of a few KiB, quoted whole, would turn NOT_FOUND into
    a RESOURCE_EXHAUSTED about metadata size.
    """
    return value if len(value) <= limit else f"{value[:limit]}... ({len(value)} characters)"


@dataclass(frozen=True)
class FieldViolation:
    """A request field at fault, as in google.rpc.BadRequest."""

    field: str
    description: str


class MeshError(Exception):
    """A failure with a reason from the table and everything a client needs."""

    def __init__(
        self,
        reason: Reason,
        message: str,
        *,
        violations: Iterable[FieldViolation] = (),
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.violations = tuple(violations)
        self.metadata = dict(metadata or {})
        self.retry_after = retry_after
        # HTTP headers an HTTP face adds to its reply (e.g. a tenant's
        # x-ratelimit-* windows on a refusal); never sent over gRPC.
        self.headers: dict[str, str] = {}

    @property
    def code(self) -> str:
        """The gRPC status code name for this error."""
        return TABLE[self.reason].code

    @property
    def retryable(self) -> bool:
        return TABLE[self.reason].retryable

    @property
    def http_status(self) -> int:
        """The HTTP status for this error (through its gRPC code)."""
        return HTTP_STATUS_OF_REASON.get(self.reason) or HTTP_STATUS[self.code]

    def __repr__(self) -> str:
        return f"MeshError({self.reason.value}, {self.message!r})"


# At most this many field violations travel (see clip() for why).
MAX_VIOLATIONS = 10


def invalid(violations: Iterable[FieldViolation]) -> MeshError:
    """An INVALID_ARGUMENT error whose message lists every violation (the first
    MAX_VIOLATIONS of them, when a request has more)."""
    every = tuple(violations)
    items = every[:MAX_VIOLATIONS]
    text = "; ".join(f"{v.field}: {v.description}" for v in items)
    what = "invalid request"
    if len(every) > len(items):
        what += f" ({len(every)} problems, the first {len(items)} here)"
    return MeshError(
        Reason.INVALID_ARGUMENT,
        f"{what}: {text}",
        violations=items,
        metadata={"fields": ",".join(v.field for v in items)},
    )
