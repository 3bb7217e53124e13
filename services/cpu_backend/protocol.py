"""TGI's request model, validation rules, error table and response shapes.

Transport-free: nothing here imports aiohttp. Behaviour and messages follow
TGI's router (router/src/lib.rs, validation.rs, infer/mod.rs, server.rs):

* the body is read like axum's `Json` extractor does: wrong content type 415,
  broken JSON 400, JSON of the wrong shape 422 (axum answers these in plain
  text; we answer JSON so every error body parses the same way);
* parameters default like serde does: `parameters` absent means
  `do_sample: true, max_new_tokens: 100`; `max_new_tokens` absent means 100,
  explicitly null means "up to max_total_tokens";
* `Validator.validate` runs TGI's checks in TGI's order with TGI's messages.
"""

from __future__ import annotations

import json
import math
import random
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from services.cpu_backend.engine import SamplingParams, Token
from services.cpu_backend.settings import ServerSettings

# When max_new_tokens is null TGI checks the length limit with at most this
# many new tokens (router/src/validation.rs DEFAULT_GENERATION_LENGTH).
DEFAULT_GENERATION_LENGTH: Final = 1024
_U32_MAX: Final = 2**32 - 1
_U64_MAX: Final = 2**64 - 1
_I32_MIN: Final = -(2**31)
_I32_MAX: Final = 2**31 - 1
_F32_MAX: Final = 3.4028234663852886e38


def dumps(obj: Any) -> bytes:
    """Compact JSON like serde_json: no spaces, raw UTF-8, no NaN."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


# -- errors -----------------------------------------------------------------


@dataclass(frozen=True)
class ErrorSpec:
    """One row of TGI's error table."""

    status: int
    error_type: str
    # Label of tgi_request_failure{err=...}.
    metric_label: str


# The single error table: InferError kind -> HTTP status, body error_type and
# failure-metric label (router/src/server.rs `From<InferError>`).
ERRORS: Final[Mapping[str, ErrorSpec]] = {
    "validation": ErrorSpec(422, "validation", "validation"),
    "overloaded": ErrorSpec(429, "overloaded", "overloaded"),
    "generation": ErrorSpec(424, "generation", "generation"),
    "incomplete_generation": ErrorSpec(500, "incomplete_generation", "incomplete"),
}


class InferError(Exception):
    """An error TGI reports as `{"error": message, "error_type": ...}`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.spec = ERRORS[kind]

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.spec.error_type}

    @classmethod
    def validation(cls, detail: str) -> InferError:
        return cls("validation", f"Input validation error: {detail}")

    @classmethod
    def overloaded(cls) -> InferError:
        return cls("overloaded", "Model is overloaded")

    @classmethod
    def generation(cls, detail: str) -> InferError:
        return cls("generation", f"Request failed during generation: {detail}")

    @classmethod
    def incomplete(cls, *, stream: bool) -> InferError:
        message = "Incomplete generation stream" if stream else "Incomplete generation"
        return cls("incomplete_generation", message)


class BodyError(Exception):
    """The body could not be read as a request at all (axum extractor rejection)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict[str, str]:
        # axum sends plain text without an error_type; "validation" lets the
        # text-generation client map these to ValidationError like a 422.
        return {"error": self.message, "error_type": "validation"}


# -- request model ----------------------------------------------------------


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
    grammar: Mapping[str, Any] | None = None
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
    grammar = raw.get("grammar")
    if grammar is not None:
        if not isinstance(grammar, dict):
            raise _invalid_type("parameters.grammar", grammar, "internally tagged enum GrammarType")
        if grammar.get("type") not in ("json", "json_object", "regex"):
            raise _data_error(
                "parameters.grammar",
                f"unknown variant `{grammar.get('type')}`, expected `json` or `regex`",
            )
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


# -- validation -------------------------------------------------------------


@dataclass(frozen=True)
class ValidRequest:
    """A request that passed validation, ready for the engine."""

    inputs: str
    input_ids: tuple[int, ...]
    input_length: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    # Whether the reply carries `details` (unary: details or decoder_input_details).
    details: bool
    decoder_input_details: bool
    return_full_text: bool
    # Seed reported in details; TGI reports it only when sampling.
    reported_seed: int | None
    # The max_new_tokens TGI validated against (metric tgi_request_max_new_tokens).
    max_new_tokens: int


class Validator:
    """TGI's `Validation`: parameter checks, tokenization and length limits."""

    def __init__(
        self,
        settings: ServerSettings,
        tokenize: Callable[[str], Awaitable[list[int]]],
        rng: random.Random | None = None,
    ) -> None:
        self._s = settings
        self._tokenize = tokenize
        self._rng = rng or random.Random()

    def check_before_admission(self, params: GenerateParameters, *, stream: bool) -> None:
        """Checks TGI makes before taking a concurrency permit (no 429 can hide them)."""
        if stream:
            if (params.best_of if params.best_of is not None else 1) != 1:
                raise InferError.validation("`best_of` != 1 is not supported when streaming tokens")
            if params.decoder_input_details:
                raise InferError.validation(
                    "`decoder_input_details` == true is not supported when streaming tokens"
                )
        elif params.best_of is not None and params.best_of > 1:
            if self._s.max_best_of == 1:
                raise InferError.validation("`best_of` != 1 is not allowed for this endpoint")
            if params.best_of > self._s.max_best_of:
                raise InferError.validation(
                    f"`best_of` must be > 0 and <= {self._s.max_best_of}. Given: {params.best_of}"
                )

    async def tokenize(self, inputs: str, truncate: int | None) -> list[int]:
        try:
            ids = await self._tokenize(inputs)
        except Exception as exc:  # the engine's tokenizer is foreign code
            raise InferError.validation(f"tokenizer error {exc}") from exc
        if truncate is not None and len(ids) > truncate:
            # TGI keeps the END of the prompt (TruncationDirection::Left).
            ids = ids[len(ids) - truncate :]
        return ids

    async def validate(
        self, request: GenerateRequest, *, default_return_full_text: bool
    ) -> ValidRequest:
        """Run TGI's checks in TGI's order; raise InferError(validation) on the first failure."""
        p = request.parameters
        s = self._s
        best_of = p.best_of if p.best_of is not None else 1
        sampling_requested = (
            p.do_sample
            or p.temperature is not None
            or p.top_k is not None
            or p.top_p is not None
            or p.typical_p is not None
        )
        if best_of > 1 and not sampling_requested:
            raise InferError.validation("you must use sampling when `best_of` is > 1")
        temperature = 1.0 if p.temperature is None else p.temperature
        if temperature <= 0.0:
            raise InferError.validation("`temperature` must be strictly positive")
        repetition_penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
        if repetition_penalty <= 0.0:
            raise InferError.validation("`repetition_penalty` must be strictly positive")
        frequency_penalty = 0.0 if p.frequency_penalty is None else p.frequency_penalty
        if not -2.0 <= frequency_penalty <= 2.0:
            raise InferError.validation("`frequency_penalty` must be >= -2.0 and <= 2.0")
        top_p = 1.0
        if p.top_p is not None:
            if p.top_p <= 0.0 or p.top_p >= 1.0:
                raise InferError.validation("`top_p` must be > 0.0 and < 1.0")
            top_p = p.top_p
        typical_p = 1.0
        if p.typical_p is not None:
            if p.typical_p <= 0.0 or p.typical_p >= 1.0:
                raise InferError.validation("`typical_p` must be > 0.0 and < 1.0")
            typical_p = p.typical_p
        top_k = 0
        if p.top_k is not None:
            if p.top_k <= 0:
                raise InferError.validation("`top_k` must be strictly positive")
            top_k = p.top_k
        if p.max_new_tokens == 0:
            raise InferError.validation("`max_new_tokens` must be strictly positive")
        if len(p.stop) > s.max_stop_sequences:
            raise InferError.validation(
                f"`stop` supports up to {s.max_stop_sequences} stop sequences. Given: {len(p.stop)}"
            )
        if p.seed is None:
            seed = self._rng.getrandbits(64)
        else:
            if best_of > 1:
                raise InferError.validation("`seed` must not be set when `best_of` > 1")
            seed = p.seed
        top_n_tokens = 0 if p.top_n_tokens is None else p.top_n_tokens
        if top_n_tokens > s.max_top_n_tokens:
            raise InferError.validation(
                f"`top_n_tokens` must be >= 0 and <= {s.max_top_n_tokens}. Given: {top_n_tokens}"
            )
        if not request.inputs:
            raise InferError.validation("`inputs` cannot be empty")
        if p.truncate is not None and (p.truncate == 0 or p.truncate > s.max_input_tokens):
            raise InferError.validation(
                f"`truncate` must be strictly positive and less than {s.max_input_tokens}. "
                f"Given: {p.truncate}"
            )
        input_ids = await self.tokenize(request.inputs, p.truncate)
        input_length = len(input_ids)
        if p.max_new_tokens is not None:
            max_new_tokens = max_total_new_tokens = p.max_new_tokens
        else:
            # null: as many as fit; TGI checks the first 1024-token slice and
            # re-queues the request until the total is used up.
            max_total_new_tokens = max(s.max_total_tokens - input_length, 0)
            max_new_tokens = min(max_total_new_tokens, DEFAULT_GENERATION_LENGTH)
        if input_length + max_new_tokens > s.max_total_tokens:
            raise InferError.validation(
                f"`inputs` tokens + `max_new_tokens` must be <= {s.max_total_tokens}. "
                f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
            )
        if input_length > s.max_input_tokens:
            raise InferError.validation(
                f"`inputs` must have less than {s.max_input_tokens} tokens. Given: {input_length}"
            )
        if p.grammar is not None:
            raise InferError.validation("grammar is not supported")
        # TGI's Python server samples when do_sample is set OR any warper is
        # active, and reports the seed only in that case.
        do_sample = (
            p.do_sample or temperature != 1.0 or top_k != 0 or top_p < 1.0 or typical_p < 1.0
        )
        sampling = SamplingParams(
            max_new_tokens=max_total_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            typical_p=typical_p,
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
            seed=seed,
        )
        return_full_text = (
            default_return_full_text if p.return_full_text is None else p.return_full_text
        )
        return ValidRequest(
            inputs=request.inputs,
            input_ids=tuple(input_ids),
            input_length=input_length,
            sampling=sampling,
            stop=p.stop,
            details=p.details or p.decoder_input_details,
            decoder_input_details=p.decoder_input_details,
            return_full_text=return_full_text,
            reported_seed=seed if do_sample else None,
            max_new_tokens=max_new_tokens,
        )


# -- responses --------------------------------------------------------------


def token_json(token: Token) -> dict[str, Any]:
    logprob = token.logprob
    if logprob is not None and not math.isfinite(logprob):
        logprob = None  # serde_json writes NaN as null
    return {"id": token.id, "text": token.text, "logprob": logprob, "special": token.special}


@dataclass
class Generation:
    """The outcome of one finished generation."""

    tokens: list[Token] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"


def generate_response(
    valid: ValidRequest, gen: Generation, prefill: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """TGI's GenerateResponse (details only when asked)."""
    text = valid.inputs + gen.text if valid.return_full_text else gen.text
    out: dict[str, Any] = {"generated_text": text}
    if valid.details:
        out["details"] = {
            "finish_reason": gen.finish_reason,
            "generated_tokens": len(gen.tokens),
            "seed": valid.reported_seed,
            "prefill": list(prefill),
            "tokens": [token_json(t) for t in gen.tokens],
        }
    return out


def stream_event(
    valid: ValidRequest, index: int, token: Token, final: Generation | None, details: bool
) -> dict[str, Any]:
    """TGI's StreamResponse; `final` set only on the last event."""
    event: dict[str, Any] = {
        "index": index,
        "token": token_json(token),
        "generated_text": None,
        "details": None,
    }
    if final is not None:
        text = valid.inputs + final.text if valid.return_full_text else final.text
        event["generated_text"] = text
        if details:
            event["details"] = {
                "finish_reason": final.finish_reason,
                "generated_tokens": len(final.tokens),
                "seed": valid.reported_seed,
                "input_length": valid.input_length,
            }
    return event


def tokenize_response(inputs: str, ids: Sequence[int], texts: Sequence[str]) -> list[dict]:
    """TGI's TokenizeResponse: each token with its character span in `inputs`."""
    out: list[dict] = []
    cursor = 0
    for token_id, text in zip(ids, texts, strict=True):
        at = inputs.find(text, cursor) if text else -1
        # Tokens absent from the text (an added BOS, half a character) get an
        # empty span at the cursor rather than a made-up position.
        start, stop = (at, at + len(text)) if at >= 0 else (cursor, cursor)
        cursor = stop
        out.append({"id": token_id, "text": text, "start": start, "stop": stop})
    return out
