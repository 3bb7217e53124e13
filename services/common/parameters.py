"""The generation parameters, each described once: its type, its valid
range, its built-in default, its name in OpenAI's API, in the proto, in
each engine's request, and its span attribute.

Validation (services.common.validation), defaults (services.common.registry),
the proto conversion (services.common.pb_convert), the OpenAI face's
reading (services.openai.requests), the engine request bodies
(services.adapter.engines) and the span attributes (tracing) read this
table. The field of `Parameters` (services.common.types) and of the proto's
`GenerationParameters` carry the entry's `name`.

Adding a parameter: an entry here, a field in `Parameters` and in the
proto's `GenerationParameters`, and a test (tests/unit/test_parameters.py
checks that the three agree).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from services.common.errors import FieldViolation
from services.common.types import Grammar, Limits, Parameters

# A check: the problem with a value (given the model's limits), or None.
Check = Callable[[Any, Limits], str | None]


@dataclass(frozen=True)
class OpenAIField:
    """How the OpenAI face reads a parameter: the field, its type and range."""

    name: str
    integer: bool = False
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class Param:
    # The field of Parameters and of the proto's GenerationParameters.
    name: str
    # Its problems at the mesh's boundary (router and adapter).
    check: Check | None
    # The value a model uses when neither the request nor the registry sets one.
    default: Any = None
    # How OpenAI's request body spells it (None: not an OpenAI field).
    openai: OpenAIField | None = None
    # Its field in an OpenAI-compatible engine's request (kinds may respell or
    # refuse it: services.common.engine_kinds).
    engine: str | None = None
    # Its field in TGI's `parameters` (None: TGI has none; refused).
    tgi: str | None = None
    # Its OpenTelemetry span attribute (None: not recorded).
    span: str | None = None


# -- checks -------------------------------------------------------------------


def _greater_than_zero(number: bool) -> Check:
    what = "a number greater than 0" if number else "greater than 0"

    def check(value: Any, limits: Limits) -> str | None:
        if math.isfinite(value) and value > 0:
            return None
        return f"must be {what}, got {value}"

    return check


def _open_unit(value: float, limits: Limits) -> str | None:
    if math.isfinite(value) and 0 < value < 1:
        return None
    return f"must be greater than 0 and less than 1, got {value}"


def _penalty(value: float, limits: Limits) -> str | None:
    if math.isfinite(value) and -2 <= value <= 2:
        return None
    return f"must be a number from -2 to 2, got {value}"


def _max_new_tokens(value: int, limits: Limits) -> str | None:
    if 1 <= value <= limits.max_new_tokens:
        return None
    return f"must be between 1 and {limits.max_new_tokens}, got {value}"


MAX_TOP_LOGPROBS = 20


def _top_logprobs(value: int, limits: Limits) -> str | None:
    if 0 <= value <= MAX_TOP_LOGPROBS:
        return None
    return f"must be from 0 to {MAX_TOP_LOGPROBS}, got {value}"


def _stop(value: tuple[str, ...], limits: Limits) -> str | None:
    if len(value) > limits.max_stop_sequences:
        return f"at most {limits.max_stop_sequences} stop sequences, got {len(value)}"
    if any(not s for s in value):
        return "stop sequences must not be empty"
    return None


MAX_GRAMMAR_CHARS = 32_000


def check_grammar(grammar: Grammar) -> list[FieldViolation]:
    """A grammar must be small, and a schema an object, a regex one that compiles."""
    field = "parameters.grammar"
    if grammar.kind == "json":
        if not isinstance(grammar.value, dict):
            return [FieldViolation(f"{field}.json_schema", "must be a JSON schema object")]
        size = len(json.dumps(grammar.value, separators=(",", ":")))
    else:
        size = len(grammar.value)
    if size > MAX_GRAMMAR_CHARS:
        return [FieldViolation(field, f"at most {MAX_GRAMMAR_CHARS} characters, got {size}")]
    if grammar.kind == "json":
        return []
    if not grammar.value:
        return [FieldViolation(f"{field}.regex", "must not be empty")]
    try:
        re.compile(grammar.value)
    except re.error as exc:
        return [FieldViolation(f"{field}.regex", f"not a regular expression: {exc}")]
    return []


# -- the table ----------------------------------------------------------------

_INT32 = 2**31 - 1
MAX_SEED = 2**64 - 1

PARAMS: tuple[Param, ...] = (
    Param("max_new_tokens", _max_new_tokens, default=20,
          # max_completion_tokens is read as its newer spelling (requests.py).
          openai=OpenAIField("max_tokens", integer=True, low=1, high=_INT32),
          engine="max_tokens", tgi="max_new_tokens", span="gen_ai.request.max_tokens"),
    Param("temperature", _greater_than_zero(number=True),
          openai=OpenAIField("temperature", low=0, high=2),
          engine="temperature", tgi="temperature", span="gen_ai.request.temperature"),
    Param("top_p", _open_unit, openai=OpenAIField("top_p", low=0, high=1),
          engine="top_p", tgi="top_p", span="gen_ai.request.top_p"),
    Param("top_k", _greater_than_zero(number=False),
          openai=OpenAIField("top_k", integer=True, low=-1, high=_INT32),
          engine="top_k", tgi="top_k", span="gen_ai.request.top_k"),
    Param("repetition_penalty", _greater_than_zero(number=True),
          openai=OpenAIField("repetition_penalty"),
          engine="repetition_penalty", tgi="repetition_penalty"),
    Param("stop", _stop, default=(), engine="stop", tgi="stop",
          span="gen_ai.request.stop_sequences"),
    Param("seed", None, openai=OpenAIField("seed", integer=True, low=0, high=MAX_SEED),
          engine="seed", tgi="seed", span="gen_ai.request.seed"),
    Param("do_sample", None, tgi="do_sample"),
    Param("grammar", None, tgi="grammar"),
    Param("frequency_penalty", _penalty,
          openai=OpenAIField("frequency_penalty", low=-2, high=2),
          engine="frequency_penalty", tgi="frequency_penalty",
          span="gen_ai.request.frequency_penalty"),
    # TGI's /generate has frequency_penalty but no presence_penalty.
    Param("presence_penalty", _penalty,
          openai=OpenAIField("presence_penalty", low=-2, high=2),
          engine="presence_penalty", tgi=None, span="gen_ai.request.presence_penalty"),
    # Per-token logprobs: TGI's `details` carry them. The OpenAI face reads
    # `logprobs` itself: a boolean on chat, the number of alternatives on
    # completions (requests.py). Engines the kind marks as unable refuse it.
    Param("logprobs", None, engine="logprobs", tgi="details"),
    # Alternatives per token (implies logprobs): TGI's `top_n_tokens`.
    Param("top_logprobs", _top_logprobs,
          openai=OpenAIField("top_logprobs", integer=True, low=0, high=MAX_TOP_LOGPROBS),
          engine="top_logprobs", tgi="top_n_tokens"),
)

BY_NAME: Mapping[str, Param] = {p.name: p for p in PARAMS}
NAMES: tuple[str, ...] = tuple(BY_NAME)
# The checks, in the table's order, of the parameters that have one.
_CHECKS: tuple[tuple[str, Check], ...] = tuple(
    (p.name, p.check) for p in PARAMS if p.check is not None
)
# Span attribute by parameter name.
SPAN: Mapping[str, str] = {p.name: p.span for p in PARAMS if p.span is not None}

# The built-in defaults, under the registry's own (registry.py).
BUILTIN_DEFAULTS = Parameters(**{p.name: p.default for p in PARAMS if p.default is not None})


def is_set(value: Any) -> bool:
    """Whether a parameter's value asks for something (None and () do not)."""
    return value is not None and value != ()


def set_fields(params: Parameters) -> dict[str, Any]:
    """The parameters a request sets, by name."""
    out = {}
    for name in NAMES:
        value = getattr(params, name)
        if value is not None and value != ():
            out[name] = value
    return out


def check_parameters(params: Parameters, limits: Limits) -> list[FieldViolation]:
    """Every problem of `params`, one field violation each."""
    out: list[FieldViolation] = []
    for name, check in _CHECKS:
        value = getattr(params, name)
        if value is None:
            continue
        problem = check(value, limits)
        if problem is not None:
            out.append(FieldViolation(f"parameters.{name}", problem))
    if params.grammar is not None:
        out += check_grammar(params.grammar)
    return out


def check_table() -> None:
    """The table, `Parameters` and the registry agree (run by the tests)."""
    declared = {f.name for f in fields(Parameters)}
    if declared != set(NAMES):
        raise AssertionError(f"Parameters {sorted(declared)} != table {sorted(NAMES)}")
