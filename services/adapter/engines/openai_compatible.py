"""The OpenAI-compatible engine driver: vLLM, SGLang, llama.cpp's servers,
Ollama, or anything else that serves `/v1/completions`, `/v1/chat/completions`
and `/v1/models`.

A prompt the adapter has rendered with the model's chat template goes to
`/v1/completions`, so scenarios and templates stay the mesh's and every
engine sees the same text. A model configured with `chat_api: engine` sends
the conversation itself to `/v1/chat/completions` instead, and the engine
applies its own template (the one shipped with the weights); `raw` requests
still go to `/v1/completions`.

Engines differ in what they accept beyond OpenAI's fields: the parameter
table (services.common.parameters) gives each parameter's spelling, and
the engine's kind (services.common.engine_kinds) respells what it names
differently; a parameter an engine cannot honour is refused with a field
violation instead of being dropped silently. Errors, whatever the engine,
go through `error_from_engine` into the one error table.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from services.adapter.engines.base import EngineInfo, EngineResult, EngineToken, Prompt
from services.adapter.engines.http import DONE, HttpEngine, SSEParser, json_or_text
from services.adapter.tool_calls.engine import CallAssembler, EngineTools
from services.adapter.tool_calls.types import ToolCallDelta, ToolChoice
from services.common.engine_kinds import KINDS, EngineKind
from services.common.errors import FieldViolation, MeshError, Reason, invalid
from services.common.parameters import BY_NAME
from services.common.types import FinishReason, Parameters, TokenLogprob

_FINISH = {
    "length": FinishReason.LENGTH,
    "stop": FinishReason.EOS_TOKEN,
    "eos": FinishReason.EOS_TOKEN,
}

# HTTP status of an engine's error -> the mesh's reason (and so, through
# services.common.errors.TABLE, the gRPC code and the client's HTTP status).
ENGINE_ERRORS: Mapping[int, Reason] = {
    400: Reason.INVALID_ARGUMENT,  # bad parameters, a prompt over the context
    401: Reason.BACKEND_UNAVAILABLE,  # the engine wants another API key
    403: Reason.BACKEND_UNAVAILABLE,
    404: Reason.BACKEND_UNAVAILABLE,  # no such model or route at that URL
    408: Reason.TIMEOUT,
    413: Reason.INVALID_ARGUMENT,
    422: Reason.INVALID_ARGUMENT,  # FastAPI's request validation
    429: Reason.OVERLOADED,
    500: Reason.MODEL_ERROR,
    502: Reason.BACKEND_UNAVAILABLE,
    503: Reason.BACKEND_UNAVAILABLE,  # engine starting, or its engine core died
    504: Reason.TIMEOUT,
}


def error_from_engine(
    status: int, payload: Any, retry_after: str | None = None
) -> MeshError:
    """An engine's error reply (or in-band stream error) as a MeshError.

    OpenAI's shape is `{"error": {"message", "type", "param", "code"}}`; vLLM
    puts the HTTP status in `code`, FastAPI answers `{"detail": ...}`, and a
    proxy may answer plain text.
    """
    message = ""
    error_type = ""
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            message = str(error.get("message") or error.get("detail") or "")
            error_type = str(error.get("type") or "")
            code = error.get("code")
            if status == 200 and isinstance(code, int):
                status = code  # an in-band error that carries its status
        elif isinstance(error, str):
            message = error
    # llama-cpp-python appends the server's stack frame to some messages.
    message = message.split("\n\n  File ", 1)[0].strip()
    if not message:
        message = f"the engine replied {status}: {str(payload)[:200]}"
    reason = ENGINE_ERRORS.get(status, Reason.MODEL_ERROR)
    metadata = {"backend_status": str(status)}
    if error_type:
        metadata["backend_error_type"] = error_type
    delay: float | None = None
    if reason is Reason.OVERLOADED:
        try:
            delay = float(retry_after) if retry_after else 1.0
        except ValueError:
            delay = 1.0
    return MeshError(reason, message, metadata=metadata, retry_after=delay)


def root_of(base_url: str) -> str:
    """The server's root for /health and /metrics: the base URL without /v1."""
    base = base_url.rstrip("/")
    return base.removesuffix("/v1")


def _spelling(kind: EngineKind, name: str) -> str | None:
    """The request field `kind` uses for parameter `name` (None: refused)."""
    if name in kind.spellings:
        return kind.spellings[name]
    return BY_NAME[name].engine


class OpenAICompatibleEngine(HttpEngine):
    """One OpenAI-compatible engine, reached over one pooled HTTP session.

    `base_url` ends in `/v1` as OpenAI clients expect (it is added when
    missing). `served_model` is the `model` field the engine expects; without
    it, the first model the engine lists on /v1/models.
    """

    api = "OpenAI"

    def __init__(
        self,
        base_url: str,
        *,
        kind: EngineKind = KINDS["openai"],
        served_model: str | None = None,
        chat_api: bool = False,
        api_key: str | None = None,
        connect_timeout: float = 2.0,
        max_connections: int = 256,
    ) -> None:
        base = base_url.rstrip("/")
        super().__init__(
            base if base.endswith("/v1") else f"{base}/v1",
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
            connect_timeout=connect_timeout, max_connections=max_connections,
        )
        self.root_url = root_of(self.base_url)
        self.kind = kind
        self.served_model = served_model
        self.chat_api = chat_api
        self._health_route: bool | None = None  # whether GET /health is served
        self._active = 0  # generations in progress through this engine
        # The fields this kind spells its own way, by parameter.
        self._names = {name: _spelling(kind, name) for name in BY_NAME}

    @property
    def applies_template(self) -> bool:
        """Whether the engine, not the adapter, renders the chat template."""
        return self.chat_api

    def native_tools(self, choice: ToolChoice) -> bool:
        """Whether the engine's own chat API takes tools with this choice."""
        return self.chat_api and choice.mode in self.kind.tool_choices

    # -- requests -----------------------------------------------------------------

    def body(
        self, prompt: Prompt, params: Parameters, stream: bool
    ) -> tuple[str, dict[str, Any]]:
        """The route and JSON body for a generation: completions for a text
        prompt, chat completions for a conversation."""
        kind = self.kind
        names = self._names
        refused: list[FieldViolation] = []

        def refuse(name: str) -> None:
            refused.append(FieldViolation(
                f"parameters.{name}", f"not supported by this model's engine ({kind.name})"))

        def put(name: str, value: Any) -> None:
            field = names[name]
            if field is None:
                refuse(name)
            else:
                body[field] = value

        body: dict[str, Any] = {"model": self.served_model or "", "stream": stream}
        if isinstance(prompt, str):
            route = "/completions"
            body["prompt"] = prompt
        elif isinstance(prompt, EngineTools):
            route = "/chat/completions"
            body["messages"] = prompt.messages()
            body.update(prompt.fields(send_choice=kind.tool_choice_field))
            last = prompt.turns[-1] if prompt.turns else None
            if (last is not None and last.role == "assistant" and not last.tool_calls
                    and kind.continue_final_message):
                body["continue_final_message"] = True  # a resumed answer, continued
                body["add_generation_prompt"] = False
        else:
            route = "/chat/completions"
            body["messages"] = [{"role": m.role, "content": m.content} for m in prompt]
            if prompt and prompt[-1].role == "assistant" and kind.continue_final_message:
                # The answer so far (a resumed stream): continued, not a new turn.
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
        if stream:
            body["stream_options"] = {"include_usage": True}
        if params.max_new_tokens is not None:
            put("max_new_tokens", params.max_new_tokens)
        if params.sampling:
            for name in ("temperature", "top_p", "seed"):
                value = getattr(params, name)
                if value is not None:
                    put(name, value)
            if params.top_k is not None:
                put("top_k", params.top_k)
        else:
            body["temperature"] = 0.0  # greedy, as TGI's do_sample=false
            if params.seed is not None:
                put("seed", params.seed)
        if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
            put("repetition_penalty", params.repetition_penalty)
        if params.stop:
            put("stop", list(params.stop))
        if params.frequency_penalty:
            put("frequency_penalty", params.frequency_penalty)
        if params.presence_penalty:
            put("presence_penalty", params.presence_penalty)
        if params.wants_logprobs:
            top = params.top_logprobs or 0
            if names["logprobs"] is None:
                refuse("logprobs" if params.logprobs else "top_logprobs")
            elif route == "/completions":
                body[names["logprobs"]] = top  # the legacy API's count of alternatives
            else:
                body[names["logprobs"]] = True
                if top:
                    put("top_logprobs", top)
        grammar = params.grammar
        if grammar is not None and grammar.kind == "json":
            if kind.json_grammar is None:
                refuse("grammar.json_schema")
            elif kind.json_grammar == "gbnf":
                body["grammar"] = _gbnf(grammar.schema())
            else:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": grammar.schema()},
                }
        elif grammar is not None:
            if kind.regex_grammar is None:
                refuse("grammar.regex")
            elif kind.regex_grammar == "structured_outputs":
                body["structured_outputs"] = {"regex": grammar.value}
                body["guided_regex"] = grammar.value  # vLLM before 0.10.2
            else:
                body[kind.regex_grammar] = grammar.value
        if refused:
            raise invalid(refused)
        return route, body

    async def _model_for(self, body: dict[str, Any]) -> None:
        if not body["model"]:
            body["model"] = await self.model_name()

    async def count_tokens(self, prompt: str, timeout: float | None) -> int | None:
        """The prompt's tokens by vLLM's tokenizer (`POST /tokenize` at the
        server's root); None for the other kinds, which have no such route."""
        if self.kind.name != "vllm":
            return None
        body: dict[str, Any] = {"model": self.served_model or "", "prompt": prompt}
        with self.engine_errors():
            await self._model_for(body)
            async with self.post_json(f"{self.root_url}/tokenize", body, timeout) as resp:
                payload = await json_or_text(resp)
                if resp.status != 200:
                    raise error_from_engine(resp.status, payload, None)
                if not isinstance(payload, dict) or not isinstance(payload.get("count"), int):
                    raise ValueError("no count")
                return int(payload["count"])

    async def generate(
        self, prompt: Prompt, params: Parameters, timeout: float | None
    ) -> EngineResult:
        route, body = self.body(prompt, params, stream=False)
        self._active += 1
        try:
            with self.engine_errors():
                await self._model_for(body)
                async with self.post_json(f"{self.base_url}{route}", body, timeout) as resp:
                    payload = await json_or_text(resp)
                    if resp.status != 200:
                        raise error_from_engine(
                            resp.status, payload, resp.headers.get("Retry-After"))
                    if not isinstance(payload, dict) or not payload.get("choices"):
                        raise ValueError("no choices")
                    choice = payload["choices"][0]
                    usage = payload.get("usage") or {}
                    text = _choice_text(choice)
                    calls = (CallAssembler().message(choice.get("message"))
                             if isinstance(prompt, EngineTools) else ())
                    return EngineResult(
                        text=text,
                        generated_tokens=int(usage.get("completion_tokens") or 0),
                        input_tokens=int(usage.get("prompt_tokens") or 0),
                        finish_reason=_finish(choice, bool(calls)),
                        tool_calls=calls,
                        logprobs=choice_logprobs(choice, params.top_logprobs or 0)
                        if params.wants_logprobs else (),
                        cached_input_tokens=_cached(usage),
                    )
        finally:
            self._active -= 1

    async def generate_stream(
        self, prompt: Prompt, params: Parameters, timeout: float | None
    ) -> AsyncIterator[EngineToken | EngineResult]:
        """Yield text as it arrives, then the final result.

        Token counts come from the usage chunk that `include_usage` asks for;
        an engine that sends none is counted one token per content chunk. On
        cancellation the response is closed unread, which closes the
        connection, and the engine aborts the request.
        """
        route, body = self.body(prompt, params, stream=True)
        want_logprobs, top = params.wants_logprobs, params.top_logprobs or 0
        assembler = CallAssembler() if isinstance(prompt, EngineTools) else None
        resp: aiohttp.ClientResponse | None = None
        finished = False
        self._active += 1
        try:
            await self._model_for(body)
            resp = await self.post_json(f"{self.base_url}{route}", body, timeout)
            if resp.status != 200:
                payload = await json_or_text(resp)
                raise error_from_engine(resp.status, payload, resp.headers.get("Retry-After"))
            events = SSEParser()
            parts: list[str] = []
            chunks = 0
            finish: FinishReason | None = None
            usage: dict[str, Any] | None = None
            done = False
            while not done:
                data = await resp.content.readany()
                if not data:
                    break
                texts: list[str] = []
                logprobs: list[TokenLogprob] = []
                calls: list[ToolCallDelta] = []
                for event in events.feed(data):
                    if event is DONE:
                        done = True
                        break
                    if "error" in event:
                        if texts:
                            yield EngineToken("".join(texts), len(texts), tuple(logprobs))
                        raise error_from_engine(200, event)
                    if event.get("usage"):
                        usage = event["usage"]
                    for choice in event.get("choices") or ():
                        text = _choice_text(choice, delta=True)
                        if text:
                            texts.append(text)
                        if want_logprobs:
                            logprobs.extend(choice_logprobs(choice, top))
                        if assembler is not None:
                            delta = choice.get("delta")
                            items = delta.get("tool_calls") if isinstance(delta, dict) else None
                            if isinstance(items, list):
                                calls.extend(assembler.feed(items))
                        if choice.get("finish_reason"):
                            finish = _finish(choice)
                if texts or logprobs or calls:
                    chunks += len(texts) or int(bool(calls))
                    parts.extend(texts)
                    yield EngineToken("".join(texts), len(texts) or int(bool(calls)),
                                      tuple(logprobs), tuple(calls))
            if finish is None:
                raise MeshError(
                    Reason.INCOMPLETE_GENERATION,
                    "the engine closed the stream before its final event",
                    metadata={"backend": self.base_url},
                )
            finished = True
            made = assembler.calls if assembler is not None else ()
            if made and finish is not FinishReason.LENGTH:
                finish = FinishReason.TOOL_CALLS  # TGI's OpenAI route says `stop`
            yield EngineResult(
                text="".join(parts),
                generated_tokens=int((usage or {}).get("completion_tokens") or chunks),
                input_tokens=int((usage or {}).get("prompt_tokens") or 0),
                finish_reason=finish,
                cached_input_tokens=_cached(usage or {}),
                tool_calls=made,
            )
        except (MeshError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            raise self.transport_error(exc) from exc
        finally:
            self._active -= 1
            if resp is not None:
                if finished:
                    resp.release()
                else:
                    resp.close()  # drop the connection: the engine aborts the request

    # -- health and limits ---------------------------------------------------------

    async def health(self, timeout: float = 2.0) -> bool:
        """GET /health where the engine serves it (vLLM, SGLang, llama-server),
        else GET /v1/models.

        llama-cpp-python's server serves no /health and answers /v1/models
        only between generations (one lock guards its model); a probe that
        gives up waiting for that lock breaks the generation in progress. So
        where /v1/models is the probe, it is not sent while this engine has
        generations in progress: the engine is serving them, and if it dies
        their errors say so (and the router marks the replica down).
        """
        if self._health_route is False and self._active > 0:
            return True
        try:
            if self._health_route is not False:
                async with self.session.get(
                    f"{self.root_url}/health", timeout=self.timeout(timeout)
                ) as resp:
                    await resp.read()
                    if resp.status != 404:
                        self._health_route = True
                        return resp.status == 200
                    self._health_route = False
            async with self.session.get(
                f"{self.base_url}/models", timeout=self.timeout(timeout)
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def models(self, timeout: float = 2.0) -> list[dict[str, Any]]:
        """The engine's /v1/models entries."""
        try:
            async with self.session.get(
                f"{self.base_url}/models", timeout=self.timeout(timeout)
            ) as resp:
                payload = await json_or_text(resp)
                if resp.status != 200:
                    raise error_from_engine(resp.status, payload)
        except MeshError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise self.transport_error(exc) from exc
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            raise MeshError(
                Reason.BACKEND_UNAVAILABLE,
                f"{self.base_url}/models is not an OpenAI model list",
                metadata={"backend": self.base_url},
            )
        return [m for m in data if isinstance(m, dict) and m.get("id")]

    async def model_name(self, timeout: float = 2.0) -> str:
        """The configured served model name, else the engine's first model."""
        if self.served_model:
            return self.served_model
        listed = await self.models(timeout)
        if not listed:
            raise MeshError(
                Reason.BACKEND_UNAVAILABLE, f"the engine at {self.base_url} lists no model",
                metadata={"backend": self.base_url},
            )
        self.served_model = str(listed[0]["id"])
        return self.served_model

    async def info(self, timeout: float = 2.0) -> EngineInfo:
        listed = await self.models(timeout)
        name = self.served_model or (str(listed[0]["id"]) if listed else "")
        if not name:
            raise MeshError(
                Reason.BACKEND_UNAVAILABLE, f"the engine at {self.base_url} lists no model",
                metadata={"backend": self.base_url},
            )
        self.served_model = name
        card = next((m for m in listed if m.get("id") == name), {})
        # vLLM reports its context as max_model_len; others report nothing.
        context = card.get("max_model_len")
        total = int(context) if isinstance(context, int) and context > 1 else 0
        return EngineInfo(
            model_id=name,
            max_input_tokens=total - 1 if total else 0,
            max_total_tokens=total,
            max_stop_sequences=4,  # OpenAI's limit
            max_concurrent_requests=128,
        )


def _gbnf(schema: dict[str, Any]) -> str:
    """A JSON schema as a llama.cpp GBNF grammar, with llama.cpp's own converter."""
    try:
        from llama_cpp.llama_grammar import json_schema_to_gbnf
    except ImportError as exc:  # an adapter image without llama-cpp-python
        raise invalid([FieldViolation(
            "parameters.grammar.json_schema",
            "this adapter cannot convert JSON schemas for llama.cpp (llama-cpp-python missing)",
        )]) from exc
    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:
        raise invalid([FieldViolation(
            "parameters.grammar.json_schema", f"llama.cpp cannot use this schema: {exc}"[:160],
        )]) from exc


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else -9999.0


def _entry(item: Any) -> TokenLogprob | None:
    """One of chat's `{token, logprob, bytes}` objects."""
    if not isinstance(item, dict):
        return None
    raw = item.get("bytes")
    token = str(item.get("token") or "")
    return TokenLogprob(
        token=token,
        logprob=_number(item.get("logprob")),
        bytes=tuple(int(b) for b in raw) if isinstance(raw, list)
        else tuple(token.encode("utf-8")) if token else None,
    )


def choice_logprobs(choice: dict[str, Any], top: int) -> tuple[TokenLogprob, ...]:
    """A choice's (or a stream chunk's) logprobs, in either of OpenAI's shapes:
    chat's `content` list, or the legacy `tokens` / `token_logprobs` /
    `top_logprobs` (a mapping of token to logprob per position)."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return ()
    out: list[TokenLogprob] = []
    content = logprobs.get("content")
    if isinstance(content, list):
        for item in content:
            entry = _entry(item)
            if entry is None:
                continue
            alternatives = [a for a in map(_entry, item.get("top_logprobs") or ())
                            if a is not None]
            out.append(TokenLogprob(entry.token, entry.logprob, entry.bytes,
                                    tuple(alternatives[:top])))
        return tuple(out)
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    for i, token in enumerate(tokens):
        text = str(token)
        ranked = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        best = sorted(ranked.items(), key=lambda kv: -_number(kv[1]))[:top]
        out.append(TokenLogprob(
            token=text,
            logprob=_number(values[i] if i < len(values) else None),
            bytes=tuple(text.encode("utf-8")) if text else None,
            top=tuple(TokenLogprob(str(t), _number(v), tuple(str(t).encode("utf-8")) or None)
                      for t, v in best),
        ))
    return tuple(out)


def _choice_text(choice: dict[str, Any], delta: bool = False) -> str:
    if "text" in choice:  # /v1/completions
        return str(choice.get("text") or "")
    message = choice.get("delta" if delta else "message") or {}
    return str(message.get("content") or "")


def _finish(choice: dict[str, Any], calls: bool = False) -> FinishReason:
    reason = str(choice.get("finish_reason") or "")
    if reason == "tool_calls" or (calls and reason != "length"):
        # An answer with calls ends with `tool_calls`, whatever the engine
        # said (TGI's OpenAI route says `stop`); cut short, with `length`.
        return FinishReason.TOOL_CALLS
    # vLLM and SGLang say which stop string or token ended it: a string is a
    # stop sequence, a token id (or nothing) the end of sequence.
    if reason == "stop" and isinstance(choice.get("stop_reason") or choice.get("matched_stop"),
                                       str):
        return FinishReason.STOP_SEQUENCE
    return _FINISH.get(reason, FinishReason.UNSPECIFIED)


def _cached(usage: Mapping[str, Any]) -> int:
    """Prompt tokens reused from the engine's prefix cache, as vLLM and SGLang
    report them (`usage.prompt_tokens_details.cached_tokens`); 0 when absent."""
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, Mapping):
        return 0
    try:
        return max(int(details.get("cached_tokens") or 0), 0)
    except (TypeError, ValueError):
        return 0
