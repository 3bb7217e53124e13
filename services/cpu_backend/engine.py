"""The engine interface the HTTP layer needs, and its llama.cpp implementation.

An engine turns prompt token ids into a stream of generated tokens. It knows
nothing about HTTP, TGI's validation or stop sequences: `server.py` applies
those on top, exactly once, for every engine (real or scripted).

`LlamaCppEngine` wraps one `llama_cpp.Llama`. llama.cpp is blocking and a
`Llama` object is not thread-safe, so every generation runs on ONE dedicated
worker thread (a single-thread executor serializes them) and hands tokens to
the event loop as they are produced. Closing the async iterator sets a flag
the worker checks before each token, so a client that goes away stops the
model within one token.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from services.cpu_backend.settings import LlamaSettings

if TYPE_CHECKING:
    import llama_cpp

logger = logging.getLogger("llmmesh.cpu_backend.engine")


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token, shaped like TGI's `Token` plus an end-of-sequence flag."""

    # Vocabulary id.
    id: int
    # Decoded text; "" while a multi-byte character is still incomplete.
    text: str
    # Log-probability of the token, None when the engine cannot tell.
    logprob: float | None
    # True for control tokens (<|im_end|>, </s>...), which TGI leaves out of
    # generated_text.
    special: bool
    # True when the engine considers this token the end of generation.
    eos: bool = False


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Validated generation parameters, already resolved to concrete values."""

    # Hard cap on generated tokens; the engine must not produce more.
    max_new_tokens: int
    # False means greedy decoding; the warpers below are then ignored.
    do_sample: bool
    temperature: float = 1.0
    # 0 disables top-k.
    top_k: int = 0
    # 1.0 disables nucleus sampling.
    top_p: float = 1.0
    # 1.0 disables typical sampling.
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    # Always set (TGI draws a random one when the client sends none).
    seed: int = 0


class EngineError(Exception):
    """Generation failed inside the engine; TGI reports it as a 424 `generation` error."""


@runtime_checkable
class Engine(Protocol):
    """What `server.create_app` needs from a model backend."""

    @property
    def model_id(self) -> str:
        """Name of the loaded model (the served name may differ)."""
        ...

    @property
    def context_length(self) -> int:
        """Most tokens (prompt + generated) one sequence may hold."""
        ...

    async def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` with the model's own special-token rules."""
        ...

    async def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Text of each token on its own (used by /tokenize and prefill details)."""
        ...

    def generate_tokens(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        on_start: Callable[[], None] | None = None,
    ) -> AsyncIterator[Token]:
        """Stream tokens until EOS or `params.max_new_tokens`.

        `on_start` is called on the event loop when the model actually starts
        on this request (the end of its queue time). Closing the iterator
        early (aclose, or cancelling the task iterating it) must stop the work.
        """
        ...

    async def health(self) -> bool:
        """True when the engine can serve requests."""
        ...

    async def close(self) -> None:
        """Stop running generations and release the model."""
        ...


class _Done:
    """Sentinel the worker thread sends after its last token."""


_DONE = _Done()
# llama.cpp treats this seed value as "pick a random seed".
_LLAMA_RANDOM_SEED = 0xFFFFFFFF


def _log_softmax_at(logits: Any, token: int) -> float | None:
    """Log-probability of `token` under the raw logits (numpy array)."""
    import numpy as np

    peak = float(logits.max())
    log_norm = peak + math.log(float(np.exp(logits - peak).sum()))
    value = float(logits[token]) - log_norm
    return value if math.isfinite(value) else None


class LlamaCppEngine:
    """An `Engine` over one `llama_cpp.Llama` instance (CPU, GGUF models)."""

    def __init__(self, settings: LlamaSettings) -> None:
        # Imported here so the HTTP layer and the test double never need the
        # native library.
        import llama_cpp

        if not settings.model_path.is_file():
            raise FileNotFoundError(f"model file not found: {settings.model_path}")
        self._lib = llama_cpp
        self._llama: llama_cpp.Llama = llama_cpp.Llama(
            model_path=str(settings.model_path),
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads,
            n_threads_batch=settings.n_threads,
            n_batch=settings.n_batch,
            verbose=False,
        )
        self._vocab = self._llama._model.vocab
        self._n_vocab = self._llama.n_vocab()
        self._model_id = settings.model_path.stem
        # One worker: a Llama object must only be driven by one thread at a time.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-generate")
        self._running: set[threading.Event] = set()
        self._healthy = True
        self._closed = False

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def context_length(self) -> int:
        return int(self._llama.n_ctx())

    async def tokenize(self, text: str) -> list[int]:
        # Tokenizing only reads the vocabulary, which llama.cpp allows from any
        # thread (llama-server does the same), so it need not wait behind a
        # running generation. add_bos=True means "add what the model's
        # metadata asks for"; special=True parses <|im_start|> etc. as control
        # tokens, since the prompt is an already-rendered chat template.
        data = text.encode("utf-8")
        return await asyncio.to_thread(self._llama.tokenize, data, True, True)

    async def token_texts(self, ids: Sequence[int]) -> list[str]:
        pieces = [self._piece(int(i), special=True) for i in ids]
        return [p.decode("utf-8", errors="replace") for p in pieces]

    async def health(self) -> bool:
        return self._healthy and not self._closed

    async def close(self) -> None:
        self._closed = True
        for flag in list(self._running):
            flag.set()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._llama.close()

    async def generate_tokens(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        on_start: Callable[[], None] | None = None,
    ) -> AsyncIterator[Token]:
        if self._closed:
            raise EngineError("engine is shut down")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Token | _Done | BaseException] = asyncio.Queue()
        stop = threading.Event()

        def post(item: Token | _Done | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:
                # The loop is gone (process shutting down): nobody is listening.
                stop.set()

        def started() -> None:
            if on_start is not None:
                try:
                    loop.call_soon_threadsafe(on_start)
                except RuntimeError:
                    stop.set()

        self._running.add(stop)
        job = loop.run_in_executor(
            self._executor, self._generate_blocking, list(prompt_ids), params, post, started, stop
        )
        job.add_done_callback(lambda _f: self._running.discard(stop))
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Done):
                    return
                if isinstance(item, BaseException):
                    raise EngineError(f"{type(item).__name__}: {item}") from item
                yield item
        finally:
            # Runs on normal end, aclose() and task cancellation alike. We do
            # not await `job`: under cancellation an await here could be
            # interrupted again; the worker sees the flag before its next token.
            stop.set()

    # -- worker thread -----------------------------------------------------

    def _piece(self, token: int, *, special: bool) -> bytes:
        """Bytes of one token, growing the buffer for long pieces."""
        lib = self._lib
        buf = ctypes.create_string_buffer(64)
        n = lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)]

    def _is_special(self, token: int) -> bool:
        lib = self._lib
        attr = lib.llama_vocab_get_attr(self._vocab, token)
        return bool(attr & lib.LLAMA_TOKEN_ATTR_CONTROL)

    def _last_logits(self) -> Any:
        import numpy as np

        ptr = self._lib.llama_get_logits_ith(self._llama._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))

    def _generate_blocking(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        post: Callable[[Token | _Done | BaseException], None],
        started: Callable[[], None],
        stop: threading.Event,
    ) -> None:
        if stop.is_set():
            # The client left while this request waited for the model.
            post(_DONE)
            return
        started()
        llama = self._llama
        # Pieces of a multi-byte character can arrive in different tokens;
        # the incremental decoder holds incomplete bytes back until the
        # character is whole, so no token text ever carries a broken char.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        if params.do_sample:
            seed = params.seed & 0xFFFFFFFF
            llama.set_seed(seed if seed != _LLAMA_RANDOM_SEED else seed - 1)
            temperature = params.temperature
        else:
            # temp == 0 selects llama.cpp's greedy sampler.
            temperature = 0.0
        try:
            generator = llama.generate(
                prompt_ids,
                top_k=params.top_k,
                top_p=params.top_p,
                # TGI has no min-p; llama-cpp-python's default (0.05) would
                # silently change the distribution.
                min_p=0.0,
                typical_p=params.typical_p,
                temp=temperature,
                repeat_penalty=params.repetition_penalty,
                frequency_penalty=params.frequency_penalty,
                reset=True,
            )
            try:
                count = 0
                for token_id in generator:
                    if stop.is_set():
                        break
                    count += 1
                    last = count >= params.max_new_tokens
                    eos = bool(self._lib.llama_vocab_is_eog(self._vocab, token_id))
                    special = eos or self._is_special(token_id)
                    piece = self._piece(token_id, special=True)
                    if special:
                        text = piece.decode("utf-8", errors="replace")
                    else:
                        text = decoder.decode(piece, final=last)
                    post(
                        Token(
                            id=int(token_id),
                            text=text,
                            logprob=_log_softmax_at(self._last_logits(), token_id),
                            special=special,
                            eos=eos,
                        )
                    )
                    if eos or last:
                        break
            finally:
                generator.close()
        except Exception as exc:  # llama_decode failures, context overflow...
            logger.exception("generation failed")
            self._healthy = False
            post(exc)
            return
        self._healthy = True
        post(_DONE)
