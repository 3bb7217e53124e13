"""Request validation, shared by the router (before anything is forwarded)
and the adapters (which can be called directly).

The rules follow TGI's own validation, so an invalid request is refused by
the mesh with field violations instead of travelling to an engine. The
parameters' rules are their table's (services.common.parameters).
"""

from __future__ import annotations

from services.adapter.tool_calls.request import NAME, check_tool_results, schema_problem
from services.adapter.tool_calls.types import Turn
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
            out.append(FieldViolation(
                "messages", "the last message must be from the user, the system or a tool"))
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


def check_tools(request: GenerationRequest) -> list[FieldViolation]:
    """Tools with valid names and schemas, a choice that names one of them or
    forces nothing without them, and tool results that answer earlier calls."""
    out: list[FieldViolation] = []
    names: set[str] = set()
    for i, tool in enumerate(request.tools):
        if not NAME.match(tool.name):
            out.append(FieldViolation(f"tools[{i}].name", "must be 1 to 64 letters, digits, "
                                      f"underscores or dashes, got {clip(tool.name)!r}"))
        elif tool.name in names:
            out.append(FieldViolation(f"tools[{i}].name", f"two tools are named {tool.name!r}"))
        names.add(tool.name)
        problem = schema_problem(tool.parameters) if tool.parameters else ""
        if problem:
            out.append(FieldViolation(f"tools[{i}].parameters", problem))
    choice = request.tool_choice
    if choice is not None and choice.mode == "named" and choice.name not in names:
        out.append(FieldViolation("tool_choice.name", f"{clip(choice.name)!r} is not in `tools`"))
    elif choice is not None and choice.mode == "required" and not request.tools:
        out.append(FieldViolation("tool_choice", "`required` needs `tools`"))
    if choice is not None and choice.forced and request.parameters.grammar is not None:
        out.append(FieldViolation("tool_choice", "a forced tool call cannot be combined with "
                                  "a grammar (response_format)"))
    if any(m.role == "tool" or m.tool_calls for m in request.messages):
        turns = [Turn(m.role, m.content, m.tool_calls, m.tool_call_id) for m in request.messages]
        out += check_tool_results(turns)
    return out


def validate(request: GenerationRequest, limits: Limits, *, continuation: bool = False) -> None:
    """Raise INVALID_ARGUMENT listing every problem of `request`."""
    violations = check_text(request, limits, continuation=continuation) + check_parameters(
        request.parameters, limits
    )
    if request.tools or request.tool_choice is not None or request.messages:
        violations += check_tools(request)
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
