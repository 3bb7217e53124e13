"""Request validation, shared by the router (before anything is forwarded)
and the adapters (which can be called directly).

The rules follow TGI's own validation, so an invalid request is refused by
the mesh with field violations instead of travelling to an engine. The
parameters' rules are their table's (services.common.parameters).
"""

from __future__ import annotations

from services.common.errors import FieldViolation, MeshError, clip, invalid
from services.common.parameters import check_parameters
from services.common.types import ROLES, GenerationRequest, Limits, ResumePolicy

# The header (gRPC metadata) that sets a stream's ResumePolicy when the
# request's own field is unset.
RESUME_HEADER = "x-llmmesh-resume"


def check_text(
    request: GenerationRequest, limits: Limits, *, continuation: bool = False
) -> list[FieldViolation]:
    """The text's problems; `continuation`: a last assistant message is the
    start of the answer to continue (the router sends one to resume a stream)."""
    out: list[FieldViolation] = []
    if request.messages:
        if len(request.messages) > limits.max_messages:
            count = len(request.messages)
            out.append(
                FieldViolation("messages", f"at most {limits.max_messages} messages, got {count}")
            )
        for i, message in enumerate(request.messages):
            if message.role not in ROLES:
                out.append(
                    FieldViolation(
                        f"messages[{i}].role",
                        f"must be one of {', '.join(ROLES)}, got {clip(message.role)!r}",
                    )
                )
        if request.messages[-1].role == "assistant" and not continuation:
            out.append(
                FieldViolation("messages", "the last message must be from the user or the system")
            )
        size = sum(len(m.content) for m in request.messages)
    else:
        if not request.inputs.strip():
            out.append(FieldViolation("inputs", "must not be empty"))
        size = len(request.inputs)
    if size > limits.max_input_chars:
        field = "messages" if request.messages else "inputs"
        out.append(
            FieldViolation(
                field, f"at most {limits.max_input_chars} characters, got {size}"
            )
        )
    return out


def validate(request: GenerationRequest, limits: Limits, *, continuation: bool = False) -> None:
    """Raise INVALID_ARGUMENT listing every problem of `request`."""
    violations = check_text(request, limits, continuation=continuation) + check_parameters(
        request.parameters, limits
    )
    if violations:
        raise invalid(violations)


def require(condition: bool, field: str, description: str) -> None:
    """Raise INVALID_ARGUMENT for one field unless `condition` holds."""
    if not condition:
        raise invalid([FieldViolation(field, description)])


def resume_policy(value: str) -> ResumePolicy:
    """The policy an `x-llmmesh-resume` value names ("auto" is the default's name)."""
    name = value.strip().lower()
    if name in ("", "auto"):
        return ResumePolicy.DEFAULT
    if name in (ResumePolicy.ALLOW.value, ResumePolicy.NEVER.value):
        return ResumePolicy(name)
    raise invalid([
        FieldViolation(RESUME_HEADER, f"must be allow, never or auto, got {clip(value)!r}")
    ])


__all__ = ["MeshError", "check_parameters", "check_text", "require", "validate"]
