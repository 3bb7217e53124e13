"""llama.cpp as a `scheduler.BatchModel`: several sequences per `llama_decode`.

Uses llama-cpp-python's low-level bindings, not its `Llama` class (which
decodes one sequence at a time): one context whose KV cache holds up to
`n_seq_max` sequences, each in a stream of its own (llama.cpp's non-unified
cache: attention of one sequence never scans another's cells, which is
faster when prompts share no prefix), one `llama_batch` per step holding
tokens of every sequence (seq_id = slot), and one sampler chain
per sequence (penalties, grammar, TGI's warpers, then greedy or a seeded
`dist`), so a request's sampling does not depend on its neighbours.
A finished sequence's cells stay in its stream when the scheduler asks
(prefix caching); `begin` trims them to the reused prefix with
`llama_memory_seq_rm(mem, slot, reused, -1)`.

Every method except `tokenize` and `token_texts` runs on the scheduler's
engine thread only; those two only read the vocabulary, which llama.cpp
allows from any thread (llama-server does the same).
"""

from __future__ import annotations

import codecs
import ctypes
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from services.cpu_backend.engine import SamplingParams, Token
from services.cpu_backend.scheduler import SlotWork
from services.cpu_backend.settings import LlamaSettings

# llama.cpp treats this seed value as "pick a random seed".
_LLAMA_RANDOM_SEED: Final = 0xFFFFFFFF
# Tokens the repetition and frequency penalties look back on (llama.cpp's default).
_PENALTY_LAST_N: Final = 64


@dataclass
class _Slot:
    """Per-sequence state: its sampler chain and its text decoder."""

    chain: Any
    decoder: Any
    max_new_tokens: int
    top_n_tokens: int
    # Greedy with nothing to apply first (no penalty, no grammar): the
    # argmax of the raw logits, taken for the whole batch at once.
    plain_greedy: bool = False
    generated: int = 0


class LlamaBatchModel:
    """A GGUF model in one llama.cpp context, decoding a batch of sequences per step."""

    def __init__(self, settings: LlamaSettings) -> None:
        # Imported here so the HTTP layer and the test double never need the
        # native library.
        import llama_cpp
        import llama_cpp._logger
        import numpy as np

        if not settings.model_path.is_file():
            raise FileNotFoundError(f"model file not found: {settings.model_path}")
        llama_cpp._logger.set_verbose(False)
        self._lib = lib = llama_cpp
        self._np = np
        lib.llama_backend_init()
        model = lib.llama_model_load_from_file(
            str(settings.model_path).encode(), lib.llama_model_default_params()
        )
        if not model:
            raise RuntimeError(f"llama.cpp could not load {settings.model_path}")
        self._model = model
        params = lib.llama_context_default_params()
        params.n_ctx = settings.n_ctx
        params.n_batch = settings.n_batch
        params.n_ubatch = settings.n_batch
        params.n_seq_max = settings.n_seq_max
        params.n_threads = settings.n_threads
        params.n_threads_batch = settings.n_threads
        params.kv_unified = False
        # Without flash attention llama.cpp's CPU attention computes each
        # query row the same way whatever the batch holds; its flash-attention
        # kernel does not, so a prompt prefilled in other chunks (or partly
        # taken from the prefix cache) could give other greedy tokens.
        params.flash_attn_type = (
            lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if settings.flash_attn
            else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.no_perf = True
        ctx = lib.llama_init_from_model(model, params)
        if not ctx:
            lib.llama_model_free(model)
            raise RuntimeError("llama.cpp could not create a context")
        self._ctx = ctx
        self._mem = lib.llama_get_memory(ctx)
        self._vocab = lib.llama_model_get_vocab(model)
        self._n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        # Cells per sequence: each has its own stream of n_ctx / n_seq_max.
        self._n_ctx = int(lib.llama_n_ctx_seq(ctx))
        # The vocabulary is static: read every token's text and kind once, so
        # a step makes no per-token foreign calls beyond decode and sampling
        # (each foreign call releases the GIL, and re-taking it can wait
        # behind the event loop).
        self._pieces = [self._piece(t) for t in range(self._n_vocab)]
        self._eog = [bool(lib.llama_vocab_is_eog(self._vocab, t)) for t in range(self._n_vocab)]
        control = lib.LLAMA_TOKEN_ATTR_CONTROL
        self._special = [
            self._eog[t] or bool(lib.llama_vocab_get_attr(self._vocab, t) & control)
            for t in range(self._n_vocab)
        ]
        self._batch = lib.llama_batch_init(settings.n_batch, 0, 1)
        self._batch_capacity = settings.n_batch
        self._slots: dict[int, _Slot] = {}
        self._model_id = settings.model_path.stem

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def context_length(self) -> int:
        return self._n_ctx

    # -- any thread ---------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        # add_special: what the model's metadata asks for (BOS...);
        # parse_special: <|im_start|> etc. are control tokens, since the prompt
        # is an already-rendered chat template.
        lib = self._lib
        data = text.encode("utf-8")
        size = len(data) + 8
        buf = (lib.llama_token * size)()
        n = lib.llama_tokenize(self._vocab, data, len(data), buf, size, True, True)
        if n < 0:
            size = -n
            buf = (lib.llama_token * size)()
            n = lib.llama_tokenize(self._vocab, data, len(data), buf, size, True, True)
        if n < 0:
            raise RuntimeError(f"llama_tokenize failed ({n})")
        return list(buf[:n])

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        pieces = self._pieces
        return [pieces[int(i)].decode("utf-8", errors="replace") for i in ids]

    def _piece(self, token: int) -> bytes:
        """Bytes of one token (control tokens included), growing the buffer if needed."""
        lib = self._lib
        buf = ctypes.create_string_buffer(64)
        n = lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)]

    # -- engine thread ------------------------------------------------------

    def begin(
        self, slot: int, prompt_ids: Sequence[int], params: SamplingParams, reused: int = 0
    ) -> int:
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        try:
            self._build_chain(chain, prompt_ids, params)
        except Exception:
            lib.llama_sampler_free(chain)
            raise
        # Keep the cells of positions [0, reused): the prompt's cached prefix.
        # A partial removal can be refused (e.g. by a recurrent model's
        # memory); then the whole sequence is cleared and prefilled again.
        if reused <= 0 or not lib.llama_memory_seq_rm(self._mem, slot, reused, -1):
            lib.llama_memory_seq_rm(self._mem, slot, -1, -1)
            reused = 0
        self._slots[slot] = _Slot(
            chain=chain,
            decoder=codecs.getincrementaldecoder("utf-8")(errors="replace"),
            max_new_tokens=params.max_new_tokens,
            top_n_tokens=params.top_n_tokens,
            plain_greedy=not params.do_sample
            and params.grammar is None
            and params.repetition_penalty == 1.0
            and params.frequency_penalty == 0.0,
        )
        return reused

    def _build_chain(self, chain: Any, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        lib = self._lib
        if params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0:
            penalties = lib.llama_sampler_init_penalties(
                self._n_vocab,
                _PENALTY_LAST_N,
                params.repetition_penalty,
                params.frequency_penalty,
                0.0,
            )
            # Like TGI, the prompt counts for the repetition penalty.
            for token in prompt_ids[-_PENALTY_LAST_N:]:
                lib.llama_sampler_accept(penalties, token)
            lib.llama_sampler_chain_add(chain, penalties)
        if params.grammar is not None:
            grammar = lib.llama_sampler_init_grammar(
                self._vocab, params.grammar.encode("utf-8"), b"root"
            )
            if not grammar:
                raise ValueError("llama.cpp could not parse the grammar")
            lib.llama_sampler_chain_add(chain, grammar)
        if not params.do_sample:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return
        # TGI's (transformers') warper order: temperature, top_k, top_p, typical.
        if params.temperature != 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(params.temperature))
        if params.top_k > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
        if params.typical_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_typical(params.typical_p, 1))
        seed = params.seed & 0xFFFFFFFF
        if seed == _LLAMA_RANDOM_SEED:
            seed -= 1
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))

    def step(self, work: Sequence[SlotWork]) -> dict[int, Token | Exception]:
        lib = self._lib
        batch = self._batch
        n = 0
        sample_at: dict[int, int] = {}
        for item in work:
            if n + len(item.tokens) > self._batch_capacity:
                raise RuntimeError("step larger than n_batch")
            for j, token in enumerate(item.tokens):
                batch.token[n] = token
                batch.pos[n] = item.pos + j
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = item.slot
                batch.logits[n] = False
                n += 1
            if item.sample:
                batch.logits[n - 1] = True
                sample_at[item.slot] = n - 1
        batch.n_tokens = n
        rc = lib.llama_decode(self._ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        out: dict[int, Token | Exception] = {}
        if not sample_at:
            return out
        # Every sampled row at once: the outputs are contiguous, in batch
        # order. One vectorised log-softmax and one argmax for the whole
        # batch keep the step's Python part (and its GIL hand-offs) short.
        np = self._np
        rows = np.ctypeslib.as_array(
            lib.llama_get_logits(self._ctx), shape=(len(sample_at), self._n_vocab)
        )
        peaks = rows.max(axis=1)
        log_norms = peaks + np.log(np.exp(rows - peaks[:, None]).sum(axis=1))
        argmax = rows.argmax(axis=1)
        for row, (slot, index) in enumerate(sample_at.items()):
            try:
                out[slot] = self._sample(
                    slot, index, rows[row], float(log_norms[row]), int(argmax[row])
                )
            except Exception as exc:
                out[slot] = exc
        return out

    def _sample(self, slot: int, index: int, logits: Any, log_norm: float, argmax: int) -> Token:
        np = self._np
        state = self._slots[slot]
        top: tuple[Token, ...] = ()
        if state.top_n_tokens:
            best = np.argpartition(-logits, state.top_n_tokens)[: state.top_n_tokens]
            best = best[np.argsort(-logits[best], kind="stable")]
            top = tuple(self._token(int(t), float(logits[t]) - log_norm, None) for t in best)
        if state.plain_greedy:
            # What the greedy sampler picks too: the first highest logit.
            token = argmax
        else:
            # The chain works on a copy of the logits: `logits` stay raw.
            token = int(self._lib.llama_sampler_sample(state.chain, self._ctx, index))
        state.generated += 1
        last = state.generated >= state.max_new_tokens
        value = float(logits[token]) - log_norm
        return self._token(token, value, state.decoder, last=last, top=top)

    def _token(
        self,
        token: int,
        logprob: float,
        decoder: Any,
        *,
        last: bool = True,
        top: tuple[Token, ...] = (),
    ) -> Token:
        eos = self._eog[token]
        special = self._special[token]
        piece = self._pieces[token]
        if special or decoder is None:
            text = piece.decode("utf-8", errors="replace")
        else:
            # A multi-byte character split over tokens comes out whole, with
            # the token that completes it.
            text = decoder.decode(piece, final=last)
        return Token(
            id=token,
            text=text,
            logprob=logprob if math.isfinite(logprob) else None,
            special=special,
            eos=eos,
            top_tokens=top,
        )

    def end(self, slot: int, keep_kv: bool = False) -> None:
        lib = self._lib
        state = self._slots.pop(slot, None)
        if state is not None:
            lib.llama_sampler_free(state.chain)
        if not keep_kv:
            lib.llama_memory_seq_rm(self._mem, slot, -1, -1)

    def close(self) -> None:
        lib = self._lib
        for slot in list(self._slots):
            self.end(slot)
        lib.llama_batch_free(self._batch)
        lib.llama_free(self._ctx)
        lib.llama_model_free(self._model)
