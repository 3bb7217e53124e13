"""gRPC side of the error table: MeshError <-> google.rpc.Status.

A MeshError leaves a service as a status whose details hold one ErrorInfo
(reason, domain, metadata), a BadRequest with field violations when fields
are at fault, and a RetryInfo when waiting may help. A status arriving from
a peer is read back into the same MeshError, so the router passes an
adapter's error on unchanged.
"""

from __future__ import annotations

import collections
import math

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common.errors import (
    CODE_FALLBACK,
    DOMAIN,
    MAX_VIOLATIONS,
    FieldViolation,
    MeshError,
    Reason,
)

_DETAILS_KEY = "grpc-status-details-bin"

# A status travels twice in HTTP/2 trailers (grpc-message, and the whole
# Status again in grpc-status-details-bin, base64), and gRPC clients refuse
# trailers over 8 KiB with RESOURCE_EXHAUSTED. Whatever a core put in an
# error, these bounds (UTF-8 bytes) keep both under 8 KiB together.
_MAX_MESSAGE = 768
_MAX_VALUE = 160
_MAX_FIELD = 64


def _cut(text: str, limit: int) -> str:
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode("utf-8", errors="ignore") + "..."


class _Status(
    collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status
):
    pass


def to_status(error: MeshError) -> grpc.Status:
    """The rich gRPC status for `error`."""
    info = error_details_pb2.ErrorInfo(
        reason=error.reason.value,
        domain=DOMAIN,
        metadata={_cut(k, _MAX_FIELD): _cut(v, _MAX_VALUE) for k, v in error.metadata.items()},
    )
    status = status_pb2.Status(
        code=code_pb2.Code.Value(error.code), message=_cut(error.message, _MAX_MESSAGE)
    )
    status.details.add().Pack(info)
    if error.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=_cut(v.field, _MAX_FIELD), description=_cut(v.description, _MAX_VALUE)
                )
                for v in error.violations[:MAX_VIOLATIONS]
            ]
        )
        status.details.add().Pack(bad)
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after * 1000))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    rich = rpc_status.to_status(status)
    if error.retry_after is None:
        return rich
    # Also as HTTP's Retry-After (whole seconds): a refusal before the first
    # message is a trailers-only response, whose metadata Envoy's transcoder
    # passes on as the HTTP/JSON answer's headers.
    retry = ("retry-after", str(max(1, math.ceil(error.retry_after))))
    return _Status(rich.code, rich.details, (*rich.trailing_metadata, retry))


def from_rpc_error(error: grpc.aio.AioRpcError) -> MeshError:
    """Read a peer's status back into a MeshError, keeping its reason."""
    code = error.code().name
    message = error.details() or code
    reason = CODE_FALLBACK.get(code, Reason.INTERNAL)
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_after: float | None = None
    for key, value in error.trailing_metadata() or ():
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                if info.reason in Reason.__members__:
                    reason = Reason(info.reason)
                metadata = dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = [
                    FieldViolation(v.field, v.description) for v in bad.field_violations
                ]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after = retry.retry_delay.ToMilliseconds() / 1000
    return MeshError(
        reason, message, violations=violations, metadata=metadata, retry_after=retry_after
    )
