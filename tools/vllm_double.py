"""A vLLM test double: vLLM's OpenAI-compatible HTTP server over a scripted engine.

The shapes are vLLM's own, read from its source (vllm-project/vllm):
- `vllm/entrypoints/openai/protocol.py` (engine/protocol.py in later
  releases): `ErrorResponse` `{"error": {"message", "type", "param", "code"}}`
  with the HTTP status as an integer `code`; `ModelCard` with `owned_by:
  "vllm"`, `root` and `max_model_len`; `CompletionResponse` and its stream
  chunks (`text_completion`, `finish_reason`, `stop_reason`: the stop string
  that matched, or None at EOS); `UsageInfo`; `stream_options.include_usage`
  adds a last chunk with empty `choices` and the usage, whose
  `prompt_tokens_details.cached_tokens` says what an automatic prefix cache
  (whole blocks of 16 tokens shared with an earlier prompt) reused, as vLLM
  reports it with `--enable-prompt-tokens-details`.
- `serving_engine.py` (`create_error_response`, `_validate_input`): a prompt
  plus max_tokens over max_model_len is a 400 `BadRequestError` "This
  model's maximum context length is N tokens. However, you requested M
  tokens (P in the messages, T in the completion). Please reduce the length
  of the messages or completion."; an unknown model a 404 `NotFoundError`
  "The model `X` does not exist.".
- `serving_completion.py` / `serving_chat.py`: an error after a stream has
  started is sent as `data: {"error": ...}`, then `data: [DONE]`.
- Tool calls (`serving_chat.py`, `protocol.py`: `ToolCall`, `DeltaToolCall`,
  `DeltaFunctionCall`; ids from `random_tool_call_id`, `chatcmpl-tool-` and
  32 hex digits): a whole answer's `message.tool_calls` with `arguments` as
  JSON text and `content` None; streamed, the first delta of a call carries
  `index`, `id`, `type` and the name with empty arguments, later ones only
  `index` and an arguments fragment (the tool parsers' shape). With a named
  `tool_choice` vLLM's named-function path streams the name again in every
  delta, without an id, and ends with `finish_reason` `stop`; with
  `auto`/`required`, `tool_calls`.
- `api_server.py`: `GET /health` is 200 while the engine lives, 503 once it
  is dead; `GET /metrics` is Prometheus text.
- `vllm/v1/metrics/loggers.py`: the gauges `vllm:num_requests_running`,
  `vllm:num_requests_waiting` and `vllm:kv_cache_usage_perc` (1 = full),
  labelled `model_name` and `engine`.

The engine is scripted: it echoes the last user turn (or the prompt), one
token per word; offered tools, it calls those the last user turn names (in
that order; the first alone with `parallel_tool_calls: false`), and under a
forced choice the named (or first) tool, each string argument being the last
word of the user turn; `--token-delay` seconds per token; at most `--max-num-seqs`
requests run at once and the rest wait, so the metrics count real requests.
KV-cache usage is the running requests' share of `--max-num-seqs`.

Run as a process:
    python -m tools.vllm_double --port 8000 [--model NAME]
        [--max-model-len N] [--max-num-seqs K] [--token-delay SECONDS]

Control (double only):
    POST /_control {"mode": "ok"|"dead"|"error_midstream"|"die_midstream"|"hang",
                    "after_tokens": 0, "token_delay": null, "status": null}
        dead: /health 503 and every generation a 503 (vLLM's EngineDeadError);
        error_midstream: after `after_tokens` tokens an in-band error event;
        die_midstream: after `after_tokens` tokens the connection is closed;
        hang: after `after_tokens` tokens nothing more is sent.
        `status`: every generation is refused with this HTTP status in
        vLLM's error shape (429, 500, 503 ... as a proxy or an overloaded
        server would send). `{}` resets.
    GET /_stats {"requests", "cancelled", "last_body", "last_traceparent"}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tools.tgi_double import alternatives, piece_logprob, scripted_reply

_WORD = re.compile(r"\s*\S+")
# vLLM's block size in tokens, and the prompts the double compares against.
PREFIX_BLOCK = 16
SEEN_PROMPTS = 64


@dataclass
class State:
    model: str
    max_model_len: int
    max_num_seqs: int
    token_delay: float
    mode: str = "ok"
    after_tokens: int = 0
    status: int | None = None
    running: int = 0
    waiting: int = 0
    requests: int = 0
    cancelled: int = 0
    last_body: Any = None
    # The W3C `traceparent` of the last generation request (vLLM joins that trace).
    last_traceparent: str | None = None
    slots: asyncio.Semaphore = field(init=False)
    base_delay: float = 0.0
    # The prompts served, as words, for the prefix-cache report (newest last).
    seen: list[list[str]] = field(default_factory=list)

    def reuse(self, prompt: list[str]) -> int:
        """Prompt tokens an automatic prefix cache would reuse: the longest
        shared beginning with a prompt served before, in whole blocks of
        PREFIX_BLOCK, never the last token (vLLM's rule)."""
        best = 0
        for earlier in self.seen:
            n = 0
            for a, b in zip(earlier, prompt, strict=False):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        self.seen.append(prompt)
        del self.seen[:-SEEN_PROMPTS]
        return min(best // PREFIX_BLOCK * PREFIX_BLOCK, max(len(prompt) - 1, 0))

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.max_num_seqs)
        self.base_delay = self.token_delay


STATE = web.AppKey("vllm_double.state", State)


def error(status: int, message: str, kind: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.json_response(body, status=status)


# vLLM's request validator (entrypoints/openai/protocol.py), and the chat
# template's refusal when `continue_final_message` comes without
# `add_generation_prompt: false` (whose default is true).
_BOTH_PROMPT_FLAGS = ("Cannot set both `continue_final_message` and "
                      "`add_generation_prompt` to True.")
_CONTINUE_WITH_PROMPT = ("continue_final_message and add_generation_prompt are not "
                         "compatible. Use continue_final_message when you want the model "
                         "to continue the final message, and add_generation_prompt when "
                         "you want to add a header that will prompt it to start a new "
                         "assistant message instead.")


def _continue_refusal(body: dict[str, Any]) -> str | None:
    if not body.get("continue_final_message"):
        return None
    if body.get("add_generation_prompt"):
        return _BOTH_PROMPT_FLAGS
    if body.get("add_generation_prompt", True):
        return _CONTINUE_WITH_PROMPT
    return None


def _continued(body: dict[str, Any], words: list[str]) -> list[str]:
    """The reply's words after a final assistant message the engine is asked
    to continue (`continue_final_message`), as vLLM does: generation picks up
    where that message ends. Without the flag a final assistant message is a
    closed turn and the model answers afresh."""
    messages = body.get("messages") or []
    if not (body.get("continue_final_message") and messages
            and messages[-1].get("role") == "assistant"):
        if words:
            words[0] = words[0].lstrip()
        return words
    done = len(_WORD.findall(str(messages[-1].get("content") or "")))
    return words[done:]


def _prompt_of(body: dict[str, Any], chat: bool) -> str:
    if chat:
        turns = [m for m in body.get("messages") or [] if m.get("role") == "user"]
        return str(turns[-1].get("content", "")) if turns else ""
    return scripted_reply(str(body.get("prompt") or ""))


async def models(request: web.Request) -> web.Response:
    s = request.app[STATE]
    card = {"id": s.model, "object": "model", "created": int(time.time()), "owned_by": "vllm",
            "root": s.model, "parent": None, "max_model_len": s.max_model_len,
            "permission": []}
    return web.json_response({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.Response:
    return web.Response(status=503 if request.app[STATE].mode == "dead" else 200)


async def metrics(request: web.Request) -> web.Response:
    s = request.app[STATE]
    labels = f'{{engine="0",model_name="{s.model}"}}'
    lines = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{labels} {float(s.running)}",
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{labels} {float(s.waiting)}",
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{labels} {s.running / s.max_num_seqs}",
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def tokenize(request: web.Request) -> web.Response:
    """vLLM's /tokenize: the prompt's tokens (words here, as generation counts them)."""
    s = request.app[STATE]
    try:
        body = await request.json()
    except ValueError:
        return error(400, "Expecting value: line 1 column 1 (char 0)", "BadRequestError")
    count = len(_WORD.findall(str(body.get("prompt") or body.get("messages") or "")))
    return web.json_response(
        {"count": count, "max_model_len": s.max_model_len, "tokens": list(range(count))})


async def generate(request: web.Request) -> web.StreamResponse:
    s = request.app[STATE]
    chat = request.path.endswith("/chat/completions")
    try:
        body = await request.json()
    except ValueError:
        return error(400, "Expecting value: line 1 column 1 (char 0)", "BadRequestError")
    s.requests += 1
    s.last_body = body
    s.last_traceparent = request.headers.get("traceparent")
    if s.mode == "dead":
        return error(503, "The engine is dead.", "EngineDeadError")
    if s.status is not None:
        return error(s.status, f"scripted error {s.status}", "ServiceUnavailableError"
                     if s.status == 503 else "BadRequestError")
    if body.get("model") != s.model:
        return error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError",
                     "model")
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and temperature < 0:
        return error(400, f"temperature must be non-negative, got {temperature}.",
                     "BadRequestError")
    refusal = _continue_refusal(body) if chat else None
    if refusal is not None:
        return error(400, refusal, "BadRequestError")
    prompt = _prompt_of(body, chat)
    prompt_tokens = len(_WORD.findall(str(body.get("prompt") or body.get("messages") or "")))
    max_tokens = int(body.get("max_tokens") or 16)
    if prompt_tokens + max_tokens > s.max_model_len:
        return error(
            400,
            f"This model's maximum context length is {s.max_model_len} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the messages or "
            "completion.", "BadRequestError")
    words = _continued(body, _WORD.findall(prompt)) if chat else _WORD.findall(prompt)
    if words and not chat:
        words[0] = words[0].lstrip()
    stops = body.get("stop") or []
    stops = [stops] if isinstance(stops, str) else list(stops)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    kind = "chat.completion" if chat else "text_completion"
    stream = bool(body.get("stream"))
    s.waiting += 1
    try:
        await s.slots.acquire()
    except asyncio.CancelledError:
        s.waiting -= 1
        s.cancelled += 1
        raise
    s.waiting -= 1
    s.running += 1
    try:
        calls = _tool_calls(body) if chat else []
        if calls:
            return await _run_calls(request, s, stream, rid, calls, prompt_tokens, body)
        return await _run(request, s, chat, stream, rid, kind, words, stops, max_tokens,
                          prompt_tokens, body)
    except asyncio.CancelledError:
        s.cancelled += 1
        raise
    finally:
        s.running -= 1
        s.slots.release()


def _logprobs(chat: bool, pieces: list[str], top: int, offset: int) -> dict[str, Any]:
    """vLLM's logprobs of `pieces` (the double's own values, as the TGI double's):
    chat's `content`, or the completions API's lists (each position's
    `top_logprobs` holds the sampled token and `top` alternatives)."""
    if chat:
        def entry(text: str, logprob: float) -> dict[str, Any]:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        return {"content": [
            {**entry(p, piece_logprob(p)),
             "top_logprobs": [entry(t.text, t.logprob or 0.0) for t in alternatives(p, top)]}
            for p in pieces]}
    offsets = []
    for p in pieces:
        offsets.append(offset)
        offset += len(p)
    return {"tokens": pieces, "token_logprobs": [piece_logprob(p) for p in pieces],
            "top_logprobs": [{t.text: t.logprob for t in alternatives(p, max(top, 1))}
                             for p in pieces],
            "text_offset": offsets}


def _wanted(chat: bool, body: dict[str, Any]) -> int | None:
    """Alternatives asked for when logprobs are (None: not asked)."""
    if chat:
        return int(body.get("top_logprobs") or 0) if body.get("logprobs") else None
    value = body.get("logprobs")
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _choice(chat: bool, text: str, finish: str | None, stop: str | None, stream: bool,
            logprobs: dict[str, Any] | None = None) -> dict:
    out: dict[str, Any] = {"index": 0, "logprobs": logprobs, "finish_reason": finish,
                           "stop_reason": stop}
    if chat:
        out["delta" if stream else "message"] = {"role": "assistant", "content": text}
    else:
        out["text"] = text
    return out


async def _run(request: web.Request, s: State, chat: bool, stream: bool, rid: str, kind: str,
               words: list[str], stops: list[str], max_tokens: int, prompt_tokens: int,
               body: dict[str, Any]) -> web.StreamResponse:
    resp: web.StreamResponse | None = None
    cached = s.reuse(_WORD.findall(str(body.get("prompt") or body.get("messages") or "")))
    if stream:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
    text, finish, stop_reason, n = "", "length", None, 0
    top = _wanted(chat, body)
    pieces: list[str] = []
    for i in range(max_tokens):
        if s.mode in ("error_midstream", "die_midstream", "hang") and i == s.after_tokens \
                and resp is not None:
            if s.mode == "error_midstream":
                event = {"error": {"message": "scripted engine failure", "type":
                                   "InternalServerError", "param": None, "code": 500}}
                await resp.write(f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode())
                return resp
            if s.mode == "die_midstream":
                await asyncio.sleep(0.05)
                if request.transport is not None:
                    request.transport.close()
                return resp
            await asyncio.Event().wait()
        if s.token_delay:
            await asyncio.sleep(s.token_delay)
        if i >= len(words):
            finish = "stop"
            break
        piece = words[i]
        hit = next((x for x in stops if x in text + piece), None)
        if hit is not None:
            finish, stop_reason = "stop", hit
            break
        offset = len(text)
        text += piece
        n += 1
        pieces.append(piece)
        if resp is not None:
            logprobs = _logprobs(chat, [piece], top, offset) if top is not None else None
            chunk = {"id": rid, "object": f"{kind}.chunk" if chat else kind,
                     "created": int(time.time()), "model": s.model,
                     "choices": [_choice(chat, piece, None, None, True, logprobs)]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + n,
             "completion_tokens": n,
             # vLLM with --enable-prompt-tokens-details: the prefix cache's reuse.
             "prompt_tokens_details": {"cached_tokens": cached}}
    if resp is None:
        return web.json_response({
            "id": rid, "object": kind, "created": int(time.time()), "model": s.model,
            "choices": [_choice(chat, text, finish, stop_reason, False,
                                _logprobs(chat, pieces, top, 0) if top is not None else None)],
            "usage": usage})
    last = {"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": int(time.time()),
            "model": s.model, "choices": [_choice(chat, "", finish, stop_reason, True)]}
    await resp.write(f"data: {json.dumps(last)}\n\n".encode())
    if (body.get("stream_options") or {}).get("include_usage"):
        tail = {"id": rid, "object": last["object"], "created": last["created"],
                "model": s.model, "choices": [], "usage": usage}
        await resp.write(f"data: {json.dumps(tail)}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def _tool_calls(body: dict[str, Any]) -> list[tuple[str, str]]:
    """The calls (name, JSON arguments) the script makes, if any."""
    tools = [t.get("function") or {} for t in body.get("tools") or [] if isinstance(t, dict)]
    choice = body.get("tool_choice", "auto")
    if not tools or choice == "none":
        return []
    messages = body.get("messages") or []
    last = messages[-1] if messages else {}
    user = str(last.get("content") or "") if last.get("role") == "user" else ""
    if isinstance(choice, dict):
        wanted = str((choice.get("function") or {}).get("name") or "")
        chosen = [t for t in tools if t.get("name") == wanted]
    else:
        named = sorted((user.find(t["name"]), i) for i, t in enumerate(tools)
                       if t.get("name") and t["name"] in user)
        chosen = [tools[i] for _, i in named]
        if not chosen and choice == "required":
            chosen = tools[:1]
    if body.get("parallel_tool_calls") is False:
        chosen = chosen[:1]
    words = re.findall(r"\w+", user or _prompt_of(body, True))
    out = []
    for tool in chosen:
        properties = (tool.get("parameters") or {}).get("properties") or {}
        arguments = {name: (words[-1] if words else "") if spec.get("type") == "string"
                     else len(words) for name, spec in properties.items()}
        out.append((str(tool["name"]), json.dumps(arguments)))
    return out


async def _run_calls(request: web.Request, s: State, stream: bool, rid: str,
                     calls: list[tuple[str, str]], prompt_tokens: int,
                     body: dict[str, Any]) -> web.StreamResponse:
    """An answer of tool calls, in vLLM's shapes."""
    named = isinstance(body.get("tool_choice"), dict)
    finish = "stop" if named else "tool_calls"
    ids = [f"chatcmpl-tool-{uuid.uuid4().hex}" for _ in calls]
    # Arguments go out in fragments of up to 8 characters, one token each.
    fragments = [[args[i:i + 8] for i in range(0, len(args), 8)] for _, args in calls]
    n = sum(len(f) for f in fragments)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
             "total_tokens": prompt_tokens + n}
    created = int(time.time())
    if not stream:
        if s.token_delay:
            await asyncio.sleep(s.token_delay * n)
        message = {"role": "assistant", "content": None, "tool_calls": [
            {"id": i, "type": "function", "function": {"name": name, "arguments": args}}
            for i, (name, args) in zip(ids, calls, strict=True)]}
        return web.json_response({
            "id": rid, "object": "chat.completion", "created": created, "model": s.model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish, "stop_reason": None}],
            "usage": usage})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)

    async def send(delta: dict[str, Any], finish_reason: str | None = None) -> None:
        chunk = {"id": rid, "object": "chat.completion.chunk", "created": created,
                 "model": s.model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                "finish_reason": finish_reason}]}
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())

    await send({"role": "assistant", "content": ""})
    for index, ((name, _), pieces) in enumerate(zip(calls, fragments, strict=True)):
        if not named:
            await send({"tool_calls": [{"id": ids[index], "type": "function", "index": index,
                                        "function": {"name": name, "arguments": ""}}]})
        for piece in pieces:
            if s.token_delay:
                await asyncio.sleep(s.token_delay)
            function = {"name": name, "arguments": piece} if named else {"arguments": piece}
            await send({"tool_calls": [{"index": index, "function": function}]})
    await send({}, finish)
    if (body.get("stream_options") or {}).get("include_usage"):
        tail = {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": s.model, "choices": [], "usage": usage}
        await resp.write(f"data: {json.dumps(tail)}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def control(request: web.Request) -> web.Response:
    s = request.app[STATE]
    data = await request.json()
    s.mode = str(data.get("mode", "ok"))
    s.after_tokens = int(data.get("after_tokens", 0))
    delay = data.get("token_delay")
    s.token_delay = float(delay) if delay is not None else s.base_delay
    status = data.get("status")
    s.status = int(status) if status is not None else None
    return web.json_response({"mode": s.mode})


async def stats(request: web.Request) -> web.Response:
    s = request.app[STATE]
    return web.json_response({"requests": s.requests, "cancelled": s.cancelled,
                              "running": s.running, "waiting": s.waiting,
                              "last_body": s.last_body,
                              "last_traceparent": s.last_traceparent})


def create_app(state: State) -> web.Application:
    app = web.Application()
    app[STATE] = state
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/_control", control)
    app.router.add_get("/_stats", stats)
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.vllm_double", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="Qwen/Qwen2-7B-Instruct-GPTQ-Int4")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--token-delay", type=float, default=0.0)
    args = p.parse_args(argv)

    async def app() -> web.Application:
        return create_app(State(args.model, args.max_model_len, args.max_num_seqs,
                                args.token_delay))

    web.run_app(app(), host=args.host, port=args.port, handler_cancellation=True,
                access_log=None, print=None, shutdown_timeout=1.0)


if __name__ == "__main__":
    main()
