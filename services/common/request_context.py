"""What a request is about, resolved once when it arrives: the model's
registry entry, its bounded metric labels, the scenario, and who asks.

The gRPC interceptor (services.common.rpc_interceptor) and the OpenAI face
resolve it through the core, once per request; routing, metrics, tracing,
log lines and the OpenAI face's replies read it instead of looking the
model up again. While a gRPC call is served it is also `current()`, for
the tracing interceptor.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.common.registry import ModelSpec

if TYPE_CHECKING:
    from services.tenancy.caller import Caller

UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class RequestContext:
    # The registry entry the request's model names (None: no such model).
    model: ModelSpec | None
    # Bounded metric labels: the model's id (or "unknown") and the scenario
    # (or "unknown").
    model_label: str
    scenario: str
    # Who asks, once tenants are known ("" until then).
    tenant: str = ""
    # Who asks and how urgently (None: the mesh has no tenants and no keys).
    caller: Caller | None = None


_CURRENT: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "llmmesh_request", default=None
)


def current() -> RequestContext | None:
    """The context of the gRPC call being served in this task, if any."""
    return _CURRENT.get()


def enter(context: RequestContext) -> None:
    """Make `context` current for the rest of this task (one gRPC call)."""
    _CURRENT.set(context)
