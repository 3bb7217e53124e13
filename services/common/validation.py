"""Request validation, shared by the router (before anything is forwarded)
and the adapters (which can be called directly).

The rules follow TGI's own validation, so an invalid request is refused by
the mesh with field violations instead of travelling to a backend.
"""

from __future__ import annotations

import json
import math
import re

from services.common.errors import FieldViolation, MeshError, clip, invalid
from services.common.types import ROLES, GenerationRequest, Grammar, Limits, Parameters


def check_parameters(params: Parameters, limits: Limits) -> list[FieldViolation]:
    out: list[FieldViolation] = []

    def bad(name: str, description: str) -> None:
        out.append(FieldViolation(f"parameters.{name}", description))

    if params.max_new_tokens is not None and not (
        1 <= params.max_new_tokens <= limits.max_new_tokens
    ):
        bad(
            "max_new_tokens",
            f"must be between 1 and {limits.max_new_tokens}, got {params.max_new_tokens}",
        )
    if params.temperature is not None and not (
        math.isfinite(params.temperature) and params.temperature > 0
    ):
        bad("temperature", f"must be a number greater than 0, got {params.temperature}")
    if params.top_p is not None and not (
        math.isfinite(params.top_p) and 0 < params.top_p < 1
    ):
        bad("top_p", f"must be greater than 0 and less than 1, got {params.top_p}")
    if params.top_k is not None and params.top_k <= 0:
        bad("top_k", f"must be greater than 0, got {params.top_k}")
    if params.repetition_penalty is not None and not (
        math.isfinite(params.repetition_penalty) and params.repetition_penalty > 0
    ):
        bad(
            "repetition_penalty",
            f"must be a number greater than 0, got {params.repetition_penalty}",
        )
    if len(params.stop) > limits.max_stop_sequences:
        bad(
            "stop",
            f"at most {limits.max_stop_sequences} stop sequences, got {len(params.stop)}",
        )
    if any(not s for s in params.stop):
        bad("stop", "stop sequences must not be empty")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(params, name)
        if value is not None and not (math.isfinite(value) and -2 <= value <= 2):
            bad(name, f"must be a number from -2 to 2, got {value}")
    if params.grammar is not None:
        out += check_grammar(params.grammar)
    return out


MAX_GRAMMAR_CHARS = 32_000


def check_grammar(grammar: Grammar) -> list[FieldViolation]:
    """A grammar must be small, and a schema an object, a regex one that compiles."""
    field = "parameters.grammar"
    if len(grammar.value) > MAX_GRAMMAR_CHARS:
        return [FieldViolation(field, f"at most {MAX_GRAMMAR_CHARS} characters, "
                                      f"got {len(grammar.value)}")]
    if grammar.kind == "json":
        try:
            schema = json.loads(grammar.value)
        except ValueError:
            schema = None
        if not isinstance(schema, dict):
            return [FieldViolation(f"{field}.json_schema", "must be a JSON schema object")]
        return []
    if not grammar.value:
        return [FieldViolation(f"{field}.regex", "must not be empty")]
    try:
        re.compile(grammar.value)
    except re.error as exc:
        return [FieldViolation(f"{field}.regex", f"not a regular expression: {exc}")]
    return []


def check_text(request: GenerationRequest, limits: Limits) -> list[FieldViolation]:
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
        if request.messages[-1].role == "assistant":
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


def validate(request: GenerationRequest, limits: Limits) -> None:
    """Raise INVALID_ARGUMENT listing every problem of `request`."""
    violations = check_text(request, limits) + check_parameters(request.parameters, limits)
    if violations:
        raise invalid(violations)


def require(condition: bool, field: str, description: str) -> None:
    """Raise INVALID_ARGUMENT for one field unless `condition` holds."""
    if not condition:
        raise invalid([FieldViolation(field, description)])


__all__ = ["MeshError", "check_parameters", "check_text", "require", "validate"]
