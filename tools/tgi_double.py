"""A scriptable TGI test double: the real TGI HTTP layer over a scripted engine.

The HTTP side is `services.cpu_backend.server.create_app`, the very code the
CPU backend serves, so validation messages, status codes, SSE framing,
headers and metrics are TGI's. Only the engine is fake: `ScriptedEngine`
implements `services.cpu_backend.engine.Engine`, the seam the real backend's
batching scheduler (`services.cpu_backend.scheduler.BatchScheduler`)
implements too: one async stream of tokens per request. Each request's
tokens come on its own clock (`token_delay`), so concurrent requests
interleave as they do in a batch; it tokenizes on whitespace, answers
deterministically, and faults can be switched on at run time.

Reply: the content of the last user turn of a ChatML or Llama 3 prompt
(or the whole prompt when it has no such turn), one token per word, then an
EOS token. Each word's logprob is `piece_logprob(word)`, and its
`top_n_tokens` alternatives are `alternatives(word, n)`. `max_new_tokens`
and stop sequences apply as in TGI. A fixed reply can be set with `--reply`
or `/_control`, and a script of replies with `replies`: one per generation
in turn, the last repeated. Scripted replies are how a model's tool-call
text reaches the mesh: the shapes tests send are each model family's own
(tests/data/tool_calls, which names every source).

Prefix cache (off unless `--prefix-cache-tokens` > 0): a model of an
engine's automatic prefix caching, shaped after vLLM's (docs "Automatic
Prefix Caching"; vllm/v1/core/kv_cache_utils.py): the prompt is cut into
blocks of `--prefix-block-tokens` tokens (vLLM's default block size, 16),
each block's hash chains the previous one's, and the double keeps the
hashes of the blocks it has prefilled, least recently used evicted first,
up to `--prefix-cache-tokens` tokens. A prompt reuses its leading blocks
found there (never its last token, which must be computed, as in vLLM);
prefill takes `--prefill-per-token` seconds per UNCACHED prompt token
before the first token. Replies report the reused tokens as
`details.cached_tokens` (the final stream event's details too; vLLM reports
them as `usage.prompt_tokens_details.cached_tokens`), and /metrics carries
the prompt tokens looked up and reused under the CPU backend's names
`llmmesh_cpu_prefix_cache_queries_total` and
`llmmesh_cpu_prefix_cache_hits_total` (vLLM's `vllm:prefix_cache_queries`
and `vllm:prefix_cache_hits`, same meaning).

Run as a process:
    python -m tools.tgi_double --port 8090 [--model-id NAME]
        [--max-concurrent-requests K] [--token-delay SECONDS] [--reply TEXT]
        [--prefix-cache-tokens N [--prefix-block-tokens 16]
         [--prefill-per-token SECONDS]]

Control endpoints (double only, never on the real backend):
    POST /_control  {"mode": "ok", "after_tokens": 0, "token_delay": 0.0,
                     "first_token_delay": 0.0, "reply": null, "replies": []}
        Sets the WHOLE fault state: omitted keys take their start values
        (the defaults above, or --token-delay/--reply), so `{}` resets. Modes:
          ok                normal replies
          generation_error  after `after_tokens` tokens the engine fails:
                            424 {"error_type":"generation"} or in-band
          overloaded        every generation request gets TGI's overload
                            error (429, in-band on streams)
          hang              after `after_tokens` tokens stop producing and
                            never answer, until the client goes away
          die_midstream     after `after_tokens` tokens close the TCP
                            connection (unary: no response at all)
          crash_midstream   after `after_tokens` tokens the process exits
                            with status 3 (os._exit)
          incomplete        after `after_tokens` tokens: streams end cleanly
                            with no final event and no error; unary gets
                            TGI's 500 incomplete_generation
          unhealthy         /health, /ping and GET / answer 503
        A fault fires only if generation gets that far: a reply shorter than
        `after_tokens` words ends with EOS first (set a longer `reply`).
    GET  /_control  current fault state
    GET  /_stats    {"requests": {"POST /generate": 2, ...},  # control routes excluded
                     "generations_started", "generations_active",
                     "generations_completed", "generations_closed_early" (stop seq.),
                     "generations_cancelled" (client went away), "generations_faulted",
                     "last_request": {"path", "body", "traceparent"},
                     "in_flight" (permits held),
                     "dropped", "failures": {err: n}, "request_count", "success_count"}
    POST /_reset    fault state and counters back to their initial values
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import os
import re
import zlib
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Final

from aiohttp import web

from services.common import logs, tracing
from services.cpu_backend.engine import EngineError, SamplingParams, Token
from services.cpu_backend.server import CORE, create_app
from services.cpu_backend.settings import ServerSettings

MODES: Final = frozenset(
    {
        "ok",
        "generation_error",
        "overloaded",
        "hang",
        "die_midstream",
        "crash_midstream",
        "incomplete",
        "unhealthy",
    }
)
# Time given to the server to write out tokens before a connection fault.
_FLUSH_DELAY: Final = 0.05
EOS_ID: Final = 0
EOS_TEXT: Final = "</s>"
# Modes that act at token `after_tokens` inside the engine.
_MIDSTREAM_FAULTS: Final = frozenset(
    {"generation_error", "hang", "die_midstream", "crash_midstream", "incomplete"}
)
_PIECE = re.compile(r"\s*\S+")
_CHATML_USER = re.compile(r"<\|im_start\|>user\s(.*?)<\|im_end\|>", re.S)
_LLAMA3_USER = re.compile(r"<\|start_header_id\|>user<\|end_header_id\|>\s*(.*?)<\|eot_id\|>", re.S)


@dataclass(frozen=True)
class Control:
    """Fault state; replaced as a whole by POST /_control."""

    mode: str = "ok"
    # Tokens emitted before the fault of the mode fires (0: before the first).
    after_tokens: int = 0
    # Seconds slept before each token.
    token_delay: float = 0.0
    # Extra seconds before the first token (a slow prefill).
    first_token_delay: float = 0.0
    # Fixed reply text instead of echoing the prompt.
    reply: str | None = None
    # Replies for the generations to come, in turn (the last one repeats);
    # set, they win over `reply`.
    replies: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Any, base: Control) -> Control:
        if not isinstance(data, dict):
            raise ValueError("body must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown keys: {sorted(unknown)}")
        ctl = replace(base, **data)
        if ctl.mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}")
        if not isinstance(ctl.after_tokens, int) or ctl.after_tokens < 0:
            raise ValueError("after_tokens must be an integer >= 0")
        for name in ("token_delay", "first_token_delay"):
            value = getattr(ctl, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a number >= 0")
        if ctl.reply is not None and not isinstance(ctl.reply, str):
            raise ValueError("reply must be a string or null")
        if not isinstance(ctl.replies, list | tuple) or not all(
                isinstance(r, str) for r in ctl.replies):
            raise ValueError("replies must be an array of strings")
        return replace(ctl, replies=tuple(ctl.replies))


INITIAL_CONTROL: Final = web.AppKey("tgi_double.initial_control", Control)


@dataclass
class Stats:
    """What tests assert on: what arrived, and what happened to generations."""

    # "POST /generate" -> count; control routes are not counted.
    requests: Counter[str] = field(default_factory=Counter)
    # Times the engine was asked to generate (i.e. requests that passed
    # admission and validation).
    generations_started: int = 0
    generations_active: int = 0
    # Ended by EOS or by reaching max_new_tokens.
    generations_completed: int = 0
    # Closed by the server before the end (a stop sequence matched).
    generations_closed_early: int = 0
    # Cancelled because the client went away (or the server shut down).
    generations_cancelled: int = 0
    # Ended by an injected fault.
    generations_faulted: int = 0
    # Path and JSON body (or text) of the last non-control request.
    last_request: dict[str, Any] | None = None

    def snapshot(self) -> dict[str, Any]:
        out = asdict(self)
        out["requests"] = dict(self.requests)
        return out


# The aiohttp request being served, for faults that act on the connection.
_CURRENT: contextvars.ContextVar[tuple[web.Request, bool] | None] = contextvars.ContextVar(
    "tgi_double_request", default=None
)


class PrefixCache:
    """The double's model of an engine's prefix cache (see the module doc).

    Blocks are identified by chained hashes of their token ids, so a block
    counts only after the same beginning; the index holds at most
    `capacity_tokens // block_tokens` blocks, least recently used first.
    """

    def __init__(
        self,
        capacity_tokens: int,
        *,
        block_tokens: int = 16,
        prefill_per_token: float = 0.0,
        serial: bool = False,
    ) -> None:
        if block_tokens < 1 or capacity_tokens < block_tokens:
            raise ValueError("the cache must hold at least one block of at least one token")
        if prefill_per_token < 0:
            raise ValueError("prefill_per_token must be >= 0")
        self.block_tokens = block_tokens
        self.capacity_blocks = capacity_tokens // block_tokens
        self.prefill_per_token = prefill_per_token
        # One prefill at a time (a compute-bound engine), when set.
        self.prefill_lock: asyncio.Lock | None = asyncio.Lock() if serial else None
        self._blocks: OrderedDict[int, None] = OrderedDict()
        # Prompt tokens looked up, and reused (vLLM's prefix_cache_queries/hits).
        self.queries = 0
        self.hits = 0

    def _hashes(self, ids: Sequence[int]) -> Iterator[int]:
        h = 0
        b = self.block_tokens
        for start in range(0, len(ids) - b + 1, b):
            h = hash((h, *ids[start : start + b]))  # ints and tuples hash alike everywhere
            yield h

    def lookup(self, ids: Sequence[int]) -> int:
        """Prompt tokens reused: the leading whole blocks held, short of the last token."""
        held = 0
        for h in self._hashes(ids):
            if h not in self._blocks:
                break
            held += self.block_tokens
        cached = min(held, max(len(ids) - 1, 0))
        self.queries += len(ids)
        self.hits += cached
        return cached

    def store(self, ids: Sequence[int]) -> None:
        """The prompt's whole blocks were prefilled; a prefix stays newer than its tail."""
        blocks = self._blocks
        for h in reversed(list(self._hashes(ids))):
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)

    def __len__(self) -> int:
        return len(self._blocks)


def _piece_id(piece: str) -> int:
    # crc32 is stable across processes (unlike hash()); ids 0-2 are reserved.
    return max(zlib.crc32(piece.encode("utf-8")), 3)


def piece_logprob(piece: str) -> float:
    """The logprob the double gives a word: from -0.001 to -0.997, stable."""
    return -((zlib.crc32(piece.encode("utf-8")) % 997) + 1) / 1000


def alternatives(piece: str, n: int) -> tuple[Token, ...]:
    """The double's `top_tokens` for a word: the word itself (the most likely),
    then `word~1`, `word~2`, ... each one less likely by 1."""
    texts = [piece] + [f"{piece}~{k}" for k in range(1, n)]
    return tuple(
        Token(id=_piece_id(t), text=t, logprob=piece_logprob(piece) - k, special=False)
        for k, t in enumerate(texts[:n])
    )


def scripted_reply(prompt: str) -> str:
    """The echo the double answers with: the last user turn, else the prompt."""
    for pattern in (_CHATML_USER, _LLAMA3_USER):
        turns = pattern.findall(prompt)
        if turns:
            return str(turns[-1]).strip()
    return prompt.strip()


class ScriptedEngine:
    """A deterministic `Engine`: whitespace tokens, echo replies, injectable faults."""

    def __init__(
        self,
        *,
        model_id: str = "tgi-double",
        context_length: int = 8192,
        batch_slots: int | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self._model_id = model_id
        self._context_length = context_length
        # Like a GPU's batch: at most this many sequences generate at once,
        # the rest wait first come first served (None: no limit).
        self._batch = asyncio.Semaphore(batch_slots) if batch_slots else None
        self.prefix_cache = prefix_cache
        # How the engine waits out a prefill (tests record it instead).
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self._pieces: dict[int, str] = {EOS_ID: EOS_TEXT}
        self.control = Control()
        self.stats = Stats()
        # Generations served from `control.replies` so far.
        self.turn = 0

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def context_length(self) -> int:
        return self._context_length

    def _encode(self, text: str) -> list[int]:
        ids = []
        for piece in _PIECE.findall(text):
            token_id = _piece_id(piece)
            self._pieces[token_id] = piece
            ids.append(token_id)
        return ids

    async def tokenize(self, text: str) -> list[int]:
        """One token per word, with the whitespace before it."""
        return self._encode(text)

    async def token_texts(self, ids: Sequence[int]) -> list[str]:
        return [self._pieces.get(i, "") for i in ids]

    async def health(self) -> bool:
        return self.control.mode != "unhealthy"

    async def close(self) -> None:
        return None

    async def _fault(self, ctl: Control) -> bool:
        """Fire the mode's fault; True when generation must end quietly."""
        current = _CURRENT.get()
        if ctl.mode == "generation_error":
            raise EngineError("scripted generation error")
        if ctl.mode in ("crash_midstream", "die_midstream", "incomplete"):
            # The server writes tokens in another task, a little behind this
            # generator: let the tokens produced so far reach the socket first.
            await asyncio.sleep(_FLUSH_DELAY)
        if ctl.mode == "crash_midstream":
            os._exit(3)
        if ctl.mode == "hang":
            await asyncio.Event().wait()
        if ctl.mode == "die_midstream" and current is not None:
            transport = current[0].transport
            if transport is not None:
                transport.close()
            await asyncio.Event().wait()
        if ctl.mode == "incomplete":
            if current is not None and current[1]:
                transport = current[0].transport
                if transport is not None:
                    # End the chunked body properly, then close: the client
                    # sees a clean end of stream without a final event.
                    transport.write(b"0\r\n\r\n")
                    transport.close()
                await asyncio.Event().wait()
            return True
        return False

    async def generate_tokens(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        on_start: Callable[[int], None] | None = None,
    ) -> AsyncIterator[Token]:
        ctl = self.control
        stats = self.stats
        stats.generations_started += 1
        stats.generations_active += 1
        outcome: str | None = None
        held = False
        try:
            if self._batch is not None:
                await self._batch.acquire()
                held = True
            cache = self.prefix_cache
            # The server reports the reused tokens (details.cached_tokens, /metrics).
            cached = cache.lookup(prompt_ids) if cache is not None else 0
            if on_start is not None:
                on_start(cached)
            prompt = "".join(self._pieces.get(i, "") for i in prompt_ids)
            if ctl.replies:
                reply = ctl.replies[min(self.turn, len(ctl.replies) - 1)]
                self.turn += 1
            else:
                reply = ctl.reply if ctl.reply is not None else scripted_reply(prompt)
            words = _PIECE.findall(reply)
            if words:
                words[0] = words[0].lstrip()
            if cache is not None:
                prefill = (len(prompt_ids) - cached) * cache.prefill_per_token
                if prefill and cache.prefill_lock is not None:
                    async with cache.prefill_lock:
                        await self.sleep(prefill)
                elif prefill:
                    await self.sleep(prefill)
                cache.store(prompt_ids)
            if ctl.first_token_delay:
                await asyncio.sleep(ctl.first_token_delay)
            for i in range(params.max_new_tokens):
                if ctl.mode in _MIDSTREAM_FAULTS and i == ctl.after_tokens:
                    if await self._fault(ctl):
                        outcome = "faulted"
                        return
                if ctl.token_delay:
                    await asyncio.sleep(ctl.token_delay)
                if i >= len(words):
                    outcome = "completed"
                    yield Token(id=EOS_ID, text=EOS_TEXT, logprob=-0.1, special=True, eos=True)
                    return
                if i == params.max_new_tokens - 1:
                    # The server closes us right after this one: a normal end.
                    outcome = "completed"
                piece = words[i]
                token_id = _piece_id(piece)
                self._pieces[token_id] = piece
                yield Token(id=token_id, text=piece, logprob=piece_logprob(piece), special=False,
                            top_tokens=alternatives(piece, params.top_n_tokens))
            outcome = "completed"
        except GeneratorExit:
            # aclose() from the server before the end: a stop sequence matched.
            outcome = outcome or "closed_early"
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except EngineError:
            outcome = "faulted"
            raise
        finally:
            if held:
                assert self._batch is not None
                self._batch.release()
            # The stats in force now: a reset carries the running count over,
            # so a generation that outlives a reset ends there; its outcome
            # belongs to the stats it started under.
            self.stats.generations_active -= 1
            name = f"generations_{outcome or 'faulted'}"
            setattr(stats, name, getattr(stats, name) + 1)


def _apply_control(app: web.Application, engine: ScriptedEngine, ctl: Control) -> None:
    engine.control = ctl
    engine.turn = 0
    core = app[CORE]
    # TGI answers 429 when its semaphore is exhausted; shrinking it to zero
    # produces exactly that path, on unary and streaming routes alike.
    core.limiter.capacity = 0 if ctl.mode == "overloaded" else core.settings.max_concurrent_requests


def create_double_app(
    engine: ScriptedEngine, settings: ServerSettings, initial: Control | None = None
) -> web.Application:
    """The TGI app over `engine`, plus the double's control routes and bookkeeping.

    `initial` is the fault state at start, and what `{}` and /_reset go back to.
    """
    app = create_app(engine, settings)
    app[INITIAL_CONTROL] = initial or Control()
    _apply_control(app, engine, app[INITIAL_CONTROL])

    @web.middleware
    async def record(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path.startswith("/_"):
            return await handler(request)
        engine.stats.requests[f"{request.method} {request.path}"] += 1
        is_stream = request.path == "/generate_stream"
        # A body over the limit is left to the server, which answers 413.
        if request.method == "POST" and (request.content_length or 0) <= settings.payload_limit:
            raw = await request.read()  # aiohttp caches it for the handler
            body: Any
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", errors="replace")
            engine.stats.last_request = {
                "path": request.path,
                "body": body,
                # W3C trace context as the caller sent it (TGI joins that trace).
                "traceparent": request.headers.get("traceparent"),
            }
            if request.path == "/" and isinstance(body, dict) and body.get("stream") is True:
                is_stream = True
        token = _CURRENT.set((request, is_stream))
        try:
            return await handler(request)
        finally:
            _CURRENT.reset(token)

    async def get_control(request: web.Request) -> web.Response:
        return web.json_response(asdict(engine.control))

    async def post_control(request: web.Request) -> web.Response:
        try:
            ctl = Control.from_json(await request.json(), app[INITIAL_CONTROL])
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        _apply_control(app, engine, ctl)
        return web.json_response(asdict(ctl))

    async def get_stats(request: web.Request) -> web.Response:
        core = app[CORE]
        out = engine.stats.snapshot()
        out["in_flight"] = core.limiter.in_use
        out["dropped"] = core.metrics.failures()["dropped"]
        out["failures"] = core.metrics.failures()
        out["request_count"] = core.metrics.request_count
        out["success_count"] = core.metrics.success_count
        return web.json_response(out)

    async def reset(request: web.Request) -> web.Response:
        _apply_control(app, engine, app[INITIAL_CONTROL])
        active = engine.stats.generations_active
        engine.stats = Stats(generations_active=active)
        return web.json_response({"ok": True})

    app.middlewares.append(record)
    app.router.add_get("/_control", get_control)
    app.router.add_post("/_control", post_control)
    app.router.add_get("/_stats", get_stats)
    app.router.add_post("/_reset", reset)
    return app


@dataclass
class RunningDouble:
    """Handle on an in-process double started by `serve()`."""

    url: str
    engine: ScriptedEngine
    app: web.Application


@asynccontextmanager
async def serve(
    settings: ServerSettings | None = None,
    engine: ScriptedEngine | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> AsyncIterator[RunningDouble]:
    """Run a double on a real socket inside the current event loop (port 0: any)."""
    engine = engine or ScriptedEngine()
    settings = settings or ServerSettings(model_id=engine.model_id)
    app = create_double_app(engine, settings)
    # handler_cancellation: a client that disconnects cancels its handler.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = runner.addresses
    bound_port = sockets[0][1]
    try:
        yield RunningDouble(url=f"http://{host}:{bound_port}", engine=engine, app=app)
    finally:
        await runner.cleanup()


def parse_sse(raw: bytes) -> list[dict[str, Any]]:
    """The JSON events of an SSE body in TGI's framing (keep-alives skipped)."""
    events = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data:"):
            events.append(json.loads(block[len(b"data:") :]))
    return events


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.tgi_double", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-id", default="tgi-double")
    parser.add_argument("--max-concurrent-requests", type=int, default=128)
    parser.add_argument("--max-input-tokens", type=int, default=4095)
    parser.add_argument("--max-total-tokens", type=int, default=4096)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--batch-slots", type=int, default=None,
                        help="sequences generating at once, like a GPU's batch; the rest "
                             "wait in order (default: no limit)")
    parser.add_argument("--reply", default=None)
    parser.add_argument(
        "--prefix-cache-tokens",
        type=int,
        default=0,
        help="model a prefix cache of this many tokens (0: none)",
    )
    parser.add_argument("--prefix-block-tokens", type=int, default=16)
    parser.add_argument(
        "--prefill-per-token",
        type=float,
        default=0.0,
        help="seconds of prefill per uncached prompt token",
    )
    parser.add_argument(
        "--serial-prefill",
        action="store_true",
        help="prefill one prompt at a time, as a compute-bound engine does",
    )
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logs.setup("tgi-double", args.log_level)
    tracing.setup("tgi-double")
    cache = None
    if args.prefix_cache_tokens > 0:
        cache = PrefixCache(
            args.prefix_cache_tokens,
            block_tokens=args.prefix_block_tokens,
            prefill_per_token=args.prefill_per_token,
            serial=args.serial_prefill,
        )
    engine = ScriptedEngine(
        model_id=args.model_id, context_length=args.max_total_tokens,
        batch_slots=args.batch_slots, prefix_cache=cache
    )
    settings = ServerSettings(
        model_id=args.model_id,
        max_concurrent_requests=args.max_concurrent_requests,
        max_input_tokens=args.max_input_tokens,
        max_total_tokens=args.max_total_tokens,
    )
    initial = Control(token_delay=args.token_delay, reply=args.reply)
    app = create_double_app(engine, settings, initial)
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=2.0,
        print=None,
    )


if __name__ == "__main__":
    main()
