"""Priority bands, and the band one request runs in.

A request's band comes from, in this order: the `x-llmmesh-priority` header
(gRPC metadata of the same name), OpenAI's `service_tier` (`flex` is batch,
`priority` is interactive, `auto` and `default` mean the tenant's own), and
the tenant's default. No request may ask for a band above its tenant's cap.
"""

from __future__ import annotations

from enum import IntEnum

from services.common.errors import FieldViolation, MeshError, invalid

HEADER = "x-llmmesh-priority"
SERVICE_TIER = "service_tier"


class Priority(IntEnum):
    """A band; a smaller value is served first."""

    INTERACTIVE = 0
    STANDARD = 1
    BATCH = 2

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Priority | None:
        """The band named `text` (any case), or None."""
        return cls.__members__.get(text.strip().upper())


NAMES = tuple(p.label for p in Priority)

# OpenAI's service_tier -> band; None: the tenant's default.
_TIERS: dict[str, Priority | None] = {
    "auto": None,
    "default": None,
    "flex": Priority.BATCH,
    "priority": Priority.INTERACTIVE,
}


def resolve(
    default: Priority,
    cap: Priority,
    header: str | None = None,
    service_tier: str | None = None,
) -> Priority:
    """The band of a request whose tenant has `default` and may use up to `cap`.

    An unknown value, or one above the cap, is INVALID_ARGUMENT naming the
    field it came in.
    """
    asked: Priority | None = None
    field = ""
    if header is not None and header.strip():
        field = HEADER
        asked = Priority.parse(header)
        if asked is None:
            raise invalid([FieldViolation(field, f"must be one of {', '.join(NAMES)}")])
    elif service_tier is not None and service_tier != "":
        field = SERVICE_TIER
        if service_tier not in _TIERS:
            raise invalid([FieldViolation(field, f"must be one of {', '.join(_TIERS)}")])
        asked = _TIERS[service_tier]
    if asked is None:
        return default
    if asked < cap:
        raise _above_cap(field, asked, cap)
    return asked


def _above_cap(field: str, asked: Priority, cap: Priority) -> MeshError:
    return invalid([FieldViolation(
        field, f"{asked.label} is above what this API key may use (at most {cap.label})",
    )])
