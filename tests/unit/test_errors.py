"""The error table and its gRPC form."""

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from services.common.errors import EDGE_ERRORS, TABLE, FieldViolation, MeshError, Reason, invalid
from services.common.rich_status import from_rpc_error, to_status
from tests.harness.procs import ROOT

EXPECTED_CODES = {
    Reason.INVALID_ARGUMENT: "INVALID_ARGUMENT",
    Reason.MODEL_NOT_FOUND: "NOT_FOUND",
    Reason.UNAUTHENTICATED: "UNAUTHENTICATED",
    Reason.OVERLOADED: "RESOURCE_EXHAUSTED",
    Reason.TIMEOUT: "DEADLINE_EXCEEDED",
    Reason.CANCELLED: "CANCELLED",
    Reason.MODEL_ERROR: "INTERNAL",
    Reason.INCOMPLETE_GENERATION: "UNAVAILABLE",
    Reason.BACKEND_UNAVAILABLE: "UNAVAILABLE",
    Reason.MODEL_UNAVAILABLE: "UNAVAILABLE",
    Reason.INTERNAL: "INTERNAL",
    Reason.ROUTE_NOT_FOUND: "NOT_FOUND",
    Reason.REQUEST_TOO_LARGE: "RESOURCE_EXHAUSTED",
    Reason.ROUTER_UNAVAILABLE: "UNAVAILABLE",
}


def test_every_reason_has_a_row():
    assert set(TABLE) == set(Reason)


@pytest.mark.parametrize(("reason", "code"), EXPECTED_CODES.items())
def test_reason_maps_to_code(reason, code):
    assert MeshError(reason, "x").code == code
    assert grpc.StatusCode[code]  # a real gRPC code name


def test_metric_labels_are_lower_snake():
    assert Reason.MODEL_ERROR.label == "model_error"
    assert Reason.TIMEOUT.label == "timeout"


def _as_rpc_error(error: MeshError) -> AioRpcError:
    status = to_status(error)
    return AioRpcError(status.code, Metadata(), Metadata(*status.trailing_metadata), status.details)


@pytest.mark.parametrize("reason", list(Reason))
def test_status_round_trip_keeps_reason(reason):
    error = MeshError(reason, f"failed: {reason}", metadata={"model_id": "qwen2"})
    back = from_rpc_error(_as_rpc_error(error))
    assert back.reason is reason
    assert back.code == error.code
    assert back.message == error.message
    assert back.metadata == {"model_id": "qwen2"}


def test_round_trip_keeps_violations_and_retry():
    error = invalid([FieldViolation("parameters.top_p", "must be < 1"),
                     FieldViolation("inputs", "must not be empty")])
    back = from_rpc_error(_as_rpc_error(error))
    assert back.violations == error.violations
    assert "parameters.top_p: must be < 1" in back.message
    busy = MeshError(Reason.OVERLOADED, "busy", retry_after=1.5)
    assert from_rpc_error(_as_rpc_error(busy)).retry_after == 1.5


def test_status_without_details_falls_back_on_code():
    plain = AioRpcError(grpc.StatusCode.UNAVAILABLE, Metadata(), Metadata(), "connect failed")
    assert from_rpc_error(plain).reason is Reason.BACKEND_UNAVAILABLE
    odd = AioRpcError(grpc.StatusCode.DATA_LOSS, Metadata(), Metadata(), "?")
    assert from_rpc_error(odd).reason is Reason.INTERNAL


def _documented_error_rows() -> dict[str, tuple[str, str]]:
    """The error table of the HTTP API's page (docs/http-api.md, "Errors")."""
    text = (ROOT / "docs" / "http-api.md").read_text(encoding="utf-8")
    section = text[text.index("\n## Errors\n"):]
    end = section.find("\n## ", 1)
    section = section if end < 0 else section[:end]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def test_documented_error_table_has_every_reason_with_its_code():
    rows = _documented_error_rows()
    assert set(rows) == {r.value for r in Reason}
    for reason, (code, _) in rows.items():
        assert code == TABLE[Reason(reason)].code, reason


def test_documented_http_status_is_envoys():
    """The HTTP column: what Envoy makes of the gRPC code, or Envoy's own status."""
    http = {"INVALID_ARGUMENT": "400", "NOT_FOUND": "404", "UNAUTHENTICATED": "401",
            "RESOURCE_EXHAUSTED": "429", "INTERNAL": "500", "UNAVAILABLE": "503",
            "DEADLINE_EXCEEDED": "504", "CANCELLED": "499"}
    edge: dict[str, set[str]] = {}
    for status, error in EDGE_ERRORS.items():
        edge.setdefault(error.reason.value, set()).add(str(status))
    for reason, (code, status) in _documented_error_rows().items():
        assert status in {http[code], *edge.get(reason, ())}, reason
