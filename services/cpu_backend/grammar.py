"""TGI's `grammar` parameter turned into a llama.cpp GBNF grammar.

* `{"type": "json", "value": <JSON schema>}`: checked as TGI's router checks
  it (an object, or a string holding one; a valid JSON schema; with a
  `properties` field), then converted by llama-cpp-python's own JSON schema
  to GBNF converter (`llama_cpp.llama_grammar`).
* `{"type": "regex", "value": "..."}`: parsed with Python's own regex parser
  and written out as GBNF. The whole output must match, as in TGI (outlines
  anchors the pattern). Constructs GBNF cannot express faithfully
  (backreferences, lookarounds, anchors inside the pattern, inline flags)
  are refused with TGI's validation error `grammar is not valid: ...` rather
  than approximated.

Errors are TGI's ValidationError texts (router/src/validation.rs):
`grammar is not supported` for a JSON value that is neither object nor
string, `grammar is not valid: {detail}` otherwise.
"""

from __future__ import annotations

import json
import re

# Python's regex parser and its opcodes (stable since 3.11 under these names).
from re import _constants as _c  # type: ignore[attr-defined]
from re import _parser as _p  # type: ignore[attr-defined]
from typing import Any, Final

from services.cpu_backend.errors import InferError
from services.cpu_backend.schema import GrammarSpec

_CATEGORIES: Final = {
    _c.CATEGORY_DIGIT: ("0-9", False),
    _c.CATEGORY_NOT_DIGIT: ("0-9", True),
    _c.CATEGORY_SPACE: (" \\t\\n\\r\\x0B\\x0C", False),
    _c.CATEGORY_NOT_SPACE: (" \\t\\n\\r\\x0B\\x0C", True),
    _c.CATEGORY_WORD: ("a-zA-Z0-9_", False),
    _c.CATEGORY_NOT_WORD: ("a-zA-Z0-9_", True),
}
# Flags a plain str pattern carries; any other (inline (?i), (?s)...) is refused.
_DEFAULT_FLAGS: Final = re.UNICODE


def invalid(detail: str) -> InferError:
    return InferError.validation(f"grammar is not valid: {detail}")


def grammar_to_gbnf(spec: GrammarSpec) -> str:
    """GBNF text for TGI's grammar parameter; InferError(validation) when refused."""
    if spec.kind == "regex":
        return regex_to_gbnf(spec.value)
    return json_schema_to_gbnf(spec.value)


# -- JSON schema ------------------------------------------------------------


def json_schema_to_gbnf(value: Any) -> str:
    if isinstance(value, str):
        try:
            schema = json.loads(value)
        except ValueError as exc:
            raise invalid(str(exc)) from None
    elif isinstance(value, dict):
        schema = value
    else:
        raise InferError.validation("grammar is not supported")
    try:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError
    except ImportError:  # pragma: no cover - jsonschema ships with the dev tools
        pass
    else:
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise invalid(exc.message) from None
    if not isinstance(schema, dict) or "properties" not in schema:
        raise invalid("Grammar must have a 'properties' field")
    try:
        from llama_cpp.llama_grammar import json_schema_to_gbnf as convert
    except ImportError:
        raise InferError.validation("grammar is not supported") from None
    try:
        return str(convert(json.dumps(schema)))
    except Exception as exc:  # the converter raises bare Exceptions on odd schemas
        raise invalid(f"cannot convert the schema to a grammar: {exc}") from None


# -- regex ------------------------------------------------------------------


def regex_to_gbnf(pattern: str) -> str:
    try:
        parsed = _p.parse(pattern)
    except re.error as exc:
        raise invalid(f"regex: {exc}") from None
    if parsed.state.flags & ~_DEFAULT_FLAGS:
        raise invalid("regex: inline flags are not supported")
    items = list(parsed)
    # The whole output must match anyway: ^ at the start and $ (or \Z) at the
    # end change nothing.
    if items and items[0] == (_c.AT, _c.AT_BEGINNING):
        items = items[1:]
    if items and items[-1][0] is _c.AT and items[-1][1] in (_c.AT_END, _c.AT_END_STRING):
        items = items[:-1]
    return f"root ::= {_sequence(items)}\n"


def _sequence(items: list[tuple[Any, Any]]) -> str:
    parts = [_node(op, av) for op, av in items]
    return " ".join(parts) if parts else '""'


def _literal(code: int) -> str:
    ch = chr(code)
    if ch in '"\\':
        return '"\\' + ch + '"'
    if ch.isprintable() and code < 0x10000:
        return f'"{ch}"'
    return f'"{_escape(code)}"'


def _escape(code: int) -> str:
    if code < 0x100:
        return f"\\x{code:02X}"
    if code < 0x10000:
        return f"\\u{code:04X}"
    return f"\\U{code:08X}"


def _class_char(code: int) -> str:
    ch = chr(code)
    if ch in "\\]^-[" or not ch.isprintable():
        return _escape(code)
    return ch


def _node(op: Any, av: Any) -> str:
    if op is _c.LITERAL:
        return _literal(av)
    if op is _c.NOT_LITERAL:
        return f"[^{_class_char(av)}]"
    if op is _c.ANY:
        return "[^\\n]"
    if op is _c.IN:
        return _char_class(av)
    if op is _c.BRANCH:
        _, alternatives = av
        return "(" + " | ".join(_sequence(list(alt)) for alt in alternatives) + ")"
    if op is _c.SUBPATTERN:
        _group, add_flags, del_flags, sub = av
        if add_flags or del_flags:
            raise invalid("regex: inline flags are not supported")
        return "(" + _sequence(list(sub)) + ")"
    if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
        lo, hi, sub = av
        inner = "(" + _sequence(list(sub)) + ")"
        if (lo, hi) == (0, _c.MAXREPEAT):
            return inner + "*"
        if (lo, hi) == (1, _c.MAXREPEAT):
            return inner + "+"
        if (lo, hi) == (0, 1):
            return inner + "?"
        if hi == _c.MAXREPEAT:
            return f"{inner}{{{lo},}}"
        if lo == hi:
            return f"{inner}{{{lo}}}"
        return f"{inner}{{{lo},{hi}}}"
    if op is _c.ATOMIC_GROUP:
        return "(" + _sequence(list(av)) + ")"
    names = {
        _c.AT: "anchors inside the pattern",
        _c.GROUPREF: "backreferences",
        _c.GROUPREF_EXISTS: "conditional groups",
        _c.ASSERT: "lookarounds",
        _c.ASSERT_NOT: "lookarounds",
    }
    raise invalid(f"regex: {names.get(op, str(op).lower())} are not supported")


def _char_class(items: list[tuple[Any, Any]]) -> str:
    negate = bool(items) and items[0][0] is _c.NEGATE
    if negate:
        items = items[1:]
    body = []
    for op, av in items:
        if op is _c.LITERAL:
            body.append(_class_char(av))
        elif op is _c.RANGE:
            body.append(f"{_class_char(av[0])}-{_class_char(av[1])}")
        elif op is _c.CATEGORY:
            chars, negated = _CATEGORIES[av]
            if negated and len(items) == 1:
                # [\D] alone is [^0-9]; mixed with others GBNF has no union of
                # a negated set, so it is refused below.
                return f"[{'' if negate else '^'}{chars}]"
            if negated:
                raise invalid("regex: a negated class escape inside a set is not supported")
            body.append(chars)
        else:
            raise invalid(f"regex: {str(op).lower()} inside a set is not supported")
    return f"[{'^' if negate else ''}{''.join(body)}]"
