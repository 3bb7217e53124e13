"""TGI's grammar parameter to llama.cpp GBNF: conversions, refusals, and
llama.cpp's own parser accepting what is produced (SmolLM2's vocabulary)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from services.cpu_backend.errors import InferError
from services.cpu_backend.grammar import grammar_to_gbnf, regex_to_gbnf
from services.cpu_backend.schema import GrammarSpec
from services.cpu_backend.settings import default_model_path

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.mark.parametrize(
    ("pattern", "gbnf"),
    [
        (r"^\d{3}-\d{4}$", r'([0-9]){3} "-" ([0-9]){4}'),
        (r"(yes|no)", r'(("y" "e" "s" | "n" "o"))'),
        (r"[A-Z][a-z]+ \w*", r'[A-Z] ([a-z])+ " " ([a-zA-Z0-9_])*'),
        (r"a.b?c*?", r'"a" [^\n] ("b")? ("c")*'),
        (r"[^\d]x{2,}y{1,3}", r'[^0-9] ("x"){2,} ("y"){1,3}'),
        (r'"\\', r'"\"" "\\"'),
        (r"[\]\-^]", r"[\x5D\x2D\x5E]"),
        ("", '""'),
    ],
)
def test_regex_converts_to_gbnf(pattern: str, gbnf: str) -> None:
    assert regex_to_gbnf(pattern) == f"root ::= {gbnf}\n"


@pytest.mark.parametrize(
    ("pattern", "detail"),
    [
        (r"(a)\1", "regex: backreferences are not supported"),
        (r"a(?=b)", "regex: lookarounds are not supported"),
        (r"a^b", "regex: anchors inside the pattern are not supported"),
        (r"(?i)abc", "regex: inline flags are not supported"),
        (r"[a\D]", "regex: a negated class escape inside a set is not supported"),
        (r"a(", "regex: missing ), unterminated subpattern at position 1"),
    ],
)
def test_regex_that_gbnf_cannot_express_is_tgis_validation_error(
    pattern: str, detail: str
) -> None:
    with pytest.raises(InferError) as info:
        regex_to_gbnf(pattern)
    assert info.value.kind == "validation"
    assert info.value.message == f"Input validation error: grammar is not valid: {detail}"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (3, "grammar is not supported"),
        ([PERSON], "grammar is not supported"),
        ({"type": "object"}, "grammar is not valid: Grammar must have a 'properties' field"),
        ({"type": 12, "properties": {}}, "grammar is not valid: 12 is not valid under any of"),
    ],
)
def test_json_schemas_tgi_refuses(value: Any, message: str) -> None:
    with pytest.raises(InferError) as info:
        grammar_to_gbnf(GrammarSpec("json", value))
    assert info.value.message.startswith(f"Input validation error: {message}")


llama_cpp = pytest.importorskip("llama_cpp", reason="run scripts/install_llama_cpp.sh")


@pytest.fixture(scope="module")
def vocab() -> Iterator[Any]:
    path = default_model_path()
    assert path is not None and path.is_file(), "run scripts/install_llama_cpp.sh"
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model
    yield llama_cpp.llama_model_get_vocab(model)
    llama_cpp.llama_model_free(model)


@pytest.mark.parametrize(
    "spec",
    [
        GrammarSpec("json", PERSON),
        GrammarSpec("json", json.dumps(PERSON)),
        GrammarSpec("json", {"type": "object", "properties": {"tags": {
            "type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}),
        GrammarSpec("regex", r"(yes|no), [0-9]{2} (apples|pears)"),
        GrammarSpec("regex", r"[\w.]+@[a-z]+\.(com|org)"),
        GrammarSpec("regex", "日本語|中文"),
    ],
)  # fmt: skip
def test_llama_cpp_parses_every_grammar_produced(vocab: Any, spec: GrammarSpec) -> None:
    gbnf = grammar_to_gbnf(spec)
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    assert sampler, gbnf
    llama_cpp.llama_sampler_free(sampler)
