"""TGI's request model and how a body is read into it.

Transport-free: nothing here imports aiohttp. Behaviour and messages follow
TGI's router (router/src/lib.rs and axum's `Json` extractor):

* wrong content type 415, broken JSON 400, JSON of the wrong shape 422
  (axum answers these in plain text; we answer JSON so every error body
  parses the same way);
* parameters default like serde does: `parameters` absent means
  `do_sample: true, max_new_tokens: 100`; `max_new_tokens` absent means 100,
  explicitly null means "up to max_total_tokens".
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from services.cpu_backend.errors import BodyError

_U32_MAX: Final = 2**32 - 1
_U64_MAX: Final = 2**64 - 1
_I32_MIN: Final = -(2**31)
_I32_MAX: Final = 2**31 - 1
_F32_MAX: Final = 3.4028234663852886e38


@dataclass(frozen=True)
class GrammarSpec:
    """TGI's GrammarType: `{"type": "json"|"regex", "value": ...}`, not yet checked."""

    # "json" (alias "json_object") or "regex".
    kind: str
    # A JSON schema (object, or a string holding one) for json; a pattern for regex.
    value: Any


@dataclass(frozen=True)
class GenerateParameters:
    """TGI's GenerateParameters with serde's per-field defaults."""

    best_of: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = 100
    return_full_text: bool | None = None
    stop: tuple[str, ...] = ()
    truncate: int | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = None
    top_n_tokens: int | None = None
    grammar: GrammarSpec | None = None
    adapter_id: str | None = None


# TGI's default_parameters(), used when the body has no `parameters` key.
DEFAULT_PARAMETERS: Final = GenerateParameters(do_sample=True)


@dataclass(frozen=True)
class GenerateRequest:
    """A parsed POST /, /generate, /generate_stream or /tokenize body."""

    inputs: str
    parameters: GenerateParameters
    # Only the compat route `/` reads it; the others decide by route.
    stream: bool = False


def _describe(value: Any) -> str:
    """serde's wording for an unexpected JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f'string "{value}"'
    if isinstance(value, list):
        return "sequence"
    return "map"


def _data_error(path: str, detail: str) -> BodyError:
    where = f"{path}: " if path else ""
    return BodyError(
        422, f"Failed to deserialize the JSON body into the target type: {where}{detail}"
    )


def _invalid_type(path: str, value: Any, expected: str) -> BodyError:
    return _data_error(path, f"invalid type: {_describe(value)}, expected {expected}")


def _to_f32(value: float) -> float:
    """Round like Rust's f32, so e.g. top_p=0.999999999 becomes 1.0 as in TGI."""
    if math.isnan(value) or abs(value) > _F32_MAX:
        return math.copysign(math.inf, value)
    return float(struct.unpack("f", struct.pack("f", value))[0])


def _float(params: Mapping[str, Any], key: str, default: float | None) -> float | None:
    if key not in params:
        return default
    value = params[key]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid_type(f"parameters.{key}", value, "f32")
    return _to_f32(float(value))


def _int(
    params: Mapping[str, Any], key: str, default: int | None, lo: int, hi: int, rust: str
) -> int | None:
    if key not in params:
        return default
    value = params[key]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid_type(f"parameters.{key}", value, rust)
    if not lo <= value <= hi:
        raise _data_error(f"parameters.{key}", f"invalid value: integer `{value}`, expected {rust}")
    return value


def _bool(params: Mapping[str, Any], key: str, default: bool) -> bool:
    if key not in params:
        return default
    value = params[key]
    if not isinstance(value, bool):
        raise _invalid_type(f"parameters.{key}", value, "a boolean")
    return value


def _opt_bool(params: Mapping[str, Any], key: str) -> bool | None:
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _invalid_type(f"parameters.{key}", value, "a boolean")
    return value


def _check_text(path: str, value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # serde_json rejects lone surrogates (\ud800) while parsing: a syntax error.
        raise BodyError(
            400, "Failed to parse the request body as JSON: lone surrogate in hex escape"
        ) from None
    return value


def _grammar(raw: Any) -> GrammarSpec | None:
    """serde's adjacently tagged enum: `type` picks the variant, `value` its content."""
    if raw is None:
        return None
    path = "parameters.grammar"
    if not isinstance(raw, dict):
        raise _invalid_type(path, raw, "adjacently tagged enum GrammarType")
    if "type" not in raw:
        raise _data_error(path, "missing field `type`")
    kind = raw["type"]
    if kind not in ("json", "json_object", "regex"):
        raise _data_error(path, f"unknown variant `{kind}`, expected `json` or `regex`")
    if "value" not in raw:
        raise _data_error(path, "missing field `value`")
    value = raw["value"]
    if kind == "regex":
        if not isinstance(value, str):
            raise _invalid_type(f"{path}.value", value, "a string")
        _check_text(f"{path}.value", value)
    return GrammarSpec(kind="regex" if kind == "regex" else "json", value=value)


def _parameters(raw: Any) -> GenerateParameters:
    if not isinstance(raw, dict):
        raise _invalid_type("parameters", raw, "struct GenerateParameters")
    stop_raw = raw.get("stop", [])
    if not isinstance(stop_raw, list):
        raise _invalid_type("parameters.stop", stop_raw, "a sequence")
    for i, item in enumerate(stop_raw):
        if not isinstance(item, str):
            raise _invalid_type(f"parameters.stop[{i}]", item, "a string")
        _check_text(f"parameters.stop[{i}]", item)
    grammar = _grammar(raw.get("grammar"))
    adapter_id = raw.get("adapter_id")
    if adapter_id is not None and not isinstance(adapter_id, str):
        raise _invalid_type("parameters.adapter_id", adapter_id, "a string")
    return GenerateParameters(
        best_of=_int(raw, "best_of", None, 0, _U64_MAX, "usize"),
        temperature=_float(raw, "temperature", None),
        repetition_penalty=_float(raw, "repetition_penalty", None),
        frequency_penalty=_float(raw, "frequency_penalty", None),
        top_k=_int(raw, "top_k", None, _I32_MIN, _I32_MAX, "i32"),
        top_p=_float(raw, "top_p", None),
        typical_p=_float(raw, "typical_p", None),
        do_sample=_bool(raw, "do_sample", False),
        max_new_tokens=_int(raw, "max_new_tokens", 100, 0, _U32_MAX, "u32"),
        return_full_text=_opt_bool(raw, "return_full_text"),
        stop=tuple(stop_raw),
        truncate=_int(raw, "truncate", None, 0, _U64_MAX, "usize"),
        watermark=_bool(raw, "watermark", False),
        details=_bool(raw, "details", False),
        decoder_input_details=_bool(raw, "decoder_input_details", False),
        seed=_int(raw, "seed", None, 0, _U64_MAX, "u64"),
        top_n_tokens=_int(raw, "top_n_tokens", None, 0, _U32_MAX, "u32"),
        grammar=grammar,
        adapter_id=adapter_id,
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def is_json_content_type(content_type: str) -> bool:
    """axum accepts application/json and application/*+json."""
    mime = content_type.split(";", 1)[0].strip().lower()
    kind, _, subtype = mime.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def parse_request(body: bytes, content_type: str, *, compat: bool = False) -> GenerateRequest:
    """Read a body like TGI's axum `Json<GenerateRequest>` (or CompatGenerateRequest)."""
    if not is_json_content_type(content_type):
        raise BodyError(415, "Expected request with `Content-Type: application/json`")
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BodyError(400, f"Failed to parse the request body as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _invalid_type("", data, "struct GenerateRequest")
    if "inputs" not in data:
        raise _data_error("", "missing field `inputs`")
    inputs = data["inputs"]
    if not isinstance(inputs, str):
        raise _invalid_type("inputs", inputs, "a string")
    _check_text("inputs", inputs)
    parameters = _parameters(data["parameters"]) if "parameters" in data else DEFAULT_PARAMETERS
    # Only CompatGenerateRequest (route `/`) has `stream`; elsewhere serde
    # ignores it like any unknown field.
    stream = data.get("stream", False) if compat else False
    if not isinstance(stream, bool):
        raise _invalid_type("stream", stream, "a boolean")
    return GenerateRequest(inputs=inputs, parameters=parameters, stream=stream)
