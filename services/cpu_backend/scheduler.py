"""Continuous batching: a waiting queue in front of a running batch, one engine thread.

`BatchScheduler` is an `engine.Engine`: each request is an async iterator of
tokens. Behind it ONE engine thread runs the decode loop over a
`BatchModel` (llama.cpp in `llama_model.py`); the asyncio side only queues
requests and relays tokens. Each loop iteration is one step:

1. drop cancelled requests (waiting or running) and free their slots;
2. admit waiting requests into the batch, oldest first, while the batch
   has room (--max-batch-size) and its token budget (prompt +
   max_new_tokens of every member, TGI's --max-batch-total-tokens) holds
   them. While a batch runs,
   TGI's --waiting-served-ratio and --max-waiting-tokens decide whether new
   requests join at this step. Each takes a KV slot from `prefix_cache`:
   the free slot whose cached tokens share the longest prefix with its
   prompt, whose prefill then starts after that prefix;
3. build one batch: the next token of every decoding sequence, then prompt
   chunks of sequences still in prefill, up to --max-batch-prefill-tokens
   (chunked prefill: a long prompt stalls running streams for one chunk, not
   for its whole length);
4. one `BatchModel.step` call: a single decode for all of them, then one
   sampled token per sequence that asked for one;
5. hand the tokens to the event loop in one call; finished sequences (EOS
   or max_new_tokens) leave the batch at once; their KV cells stay in their
   slot for a later request that starts with the same tokens.

Stop sequences, validation and HTTP live above, in `core.TgiCore`; closing a
request's iterator (stop sequence, client gone) cancels it here.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from services.cpu_backend.engine import EngineError, OnStart, SamplingParams, Token
from services.cpu_backend.prefix_cache import SlotTable
from services.cpu_backend.settings import BatchSettings

logger = logging.getLogger("llmmesh.cpu_backend.scheduler")


@dataclass(frozen=True, slots=True)
class SlotWork:
    """What one sequence contributes to one decode step."""

    # Sequence slot (llama.cpp seq_id), 0 <= slot < BatchSettings.kv_slots.
    slot: int
    # Token ids to evaluate: a prompt chunk, or the last generated token.
    tokens: Sequence[int]
    # Position of tokens[0] in the sequence.
    pos: int
    # True when a token must be sampled after the last of `tokens`.
    sample: bool


class BatchModel(Protocol):
    """A model that decodes several sequences in one step (engine thread only)."""

    @property
    def model_id(self) -> str: ...

    @property
    def context_length(self) -> int: ...

    def tokenize(self, text: str) -> list[int]:
        """Token ids; must be safe to call from any thread."""
        ...

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Text of each token on its own; must be safe to call from any thread."""
        ...

    def begin(
        self, slot: int, prompt_ids: Sequence[int], params: SamplingParams, reused: int = 0
    ) -> int:
        """Prepare `slot` for a new sequence (sampler, grammar) whose first
        `reused` prompt tokens are already in the slot's KV cells: drop every
        cell after them. Returns how many were kept (0 when the cache could
        not be trimmed and was cleared)."""
        ...

    def step(self, work: Sequence[SlotWork]) -> dict[int, Token | Exception]:
        """Decode all of `work` at once; one token (or a per-sequence error)
        for each item that asked for a sample. Raises when the decode failed."""
        ...

    def end(self, slot: int, keep_kv: bool = False) -> None:
        """Release `slot`'s sampler; its KV cells too unless `keep_kv`."""
        ...

    def close(self) -> None: ...


_DONE: Final = object()


@dataclass(frozen=True, slots=True)
class _Started:
    """The sequence joined the batch, reusing `cached` prompt tokens' KV cells."""

    cached: int


class _Inbox:
    """One request's items from the engine thread, on the event loop's side.

    Filled on the event loop only (from the one callback per step that
    `_flush` schedules): all of a step's items at once, and the waiting
    request wakes once for them.
    """

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: collections.deque[object] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None

    def put_all(self, items: list[object]) -> None:
        self.items.extend(items)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


@dataclass(eq=False)
class _Sequence:
    """One request, from the waiting queue to the end of its generation."""

    prompt: list[int]
    params: SamplingParams
    # Where the event loop puts this request's items (see _flush).
    inbox: _Inbox
    # prompt + max_new_tokens: what it reserves of max_batch_total_tokens.
    budget: int
    slot: int = -1
    # Prompt tokens in the slot's KV cells (a cached prefix counts at once).
    prefilled: int = 0
    generated: int = 0
    last_token: int = -1
    # Set from the event loop when the request goes away.
    cancelled: bool = False
    outbox: list[object] = field(default_factory=list)


def _slot_of(work: SlotWork) -> int:
    return work.slot


class BatchScheduler:
    """An `Engine` that batches every request onto one `BatchModel`."""

    def __init__(self, model: BatchModel, settings: BatchSettings) -> None:
        self._model = model
        self._s = settings
        self._cond = threading.Condition()
        self._incoming: list[_Sequence] = []
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: list[_Sequence] = []
        self._slots = SlotTable(settings.kv_slots, enabled=settings.prefix_cache)
        self._closed = False
        self._healthy = True
        self._loop: asyncio.AbstractEventLoop | None = None
        # Steps since waiting requests were last admitted (TGI's waiting_tokens).
        self._waiting_steps = 0
        # Read by /_stats-like callers and the bench: steps and tokens so far.
        self.steps = 0
        self.tokens_out = 0
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    # -- Engine ------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self._model.model_id

    @property
    def context_length(self) -> int:
        return self._model.context_length

    async def tokenize(self, text: str) -> list[int]:
        return await asyncio.to_thread(self._model.tokenize, text)

    async def token_texts(self, ids: Sequence[int]) -> list[str]:
        return self._model.token_texts(ids)

    async def health(self) -> bool:
        return self._healthy and not self._closed and self._thread.is_alive()

    async def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)
        self._model.close()

    async def generate_tokens(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        on_start: OnStart | None = None,
    ) -> AsyncIterator[Token]:
        if self._closed:
            raise EngineError("engine is shut down")
        if not prompt_ids:
            raise EngineError("empty prompt")
        loop = asyncio.get_running_loop()
        self._loop = loop
        inbox = _Inbox()
        items = inbox.items
        seq = _Sequence(
            prompt=list(prompt_ids),
            params=params,
            inbox=inbox,
            budget=len(prompt_ids) + params.max_new_tokens,
        )
        with self._cond:
            self._incoming.append(seq)
            self._cond.notify()
        try:
            while True:
                if not items:
                    inbox.waiter = loop.create_future()
                    try:
                        await inbox.waiter
                    finally:
                        inbox.waiter = None
                item = items.popleft()
                if isinstance(item, _Started):
                    if on_start is not None:
                        on_start(item.cached)
                elif item is _DONE:
                    return
                elif isinstance(item, BaseException):
                    raise EngineError(f"{type(item).__name__}: {item}") from item
                else:
                    assert isinstance(item, Token)
                    yield item
        finally:
            # Normal end, aclose() and cancellation alike: the engine thread
            # drops the sequence at its next step boundary.
            if not seq.cancelled:
                seq.cancelled = True
                with self._cond:
                    self._cond.notify()

    # -- introspection (tests, bench) --------------------------------------

    def sizes(self) -> tuple[int, int]:
        """(waiting, running) right now."""
        with self._cond:
            return len(self._waiting) + len(self._incoming), len(self._running)

    # -- engine thread -----------------------------------------------------

    def _flush(self, sequences: Sequence[_Sequence]) -> None:
        """Hand every sequence's pending items to the event loop in one call."""
        batch = []
        for s in sequences:
            if s.outbox:  # a sequence touched twice in a step has one outbox
                batch.append((s.inbox, s.outbox))
                s.outbox = []
        if not batch or self._loop is None:
            return

        def deliver_all() -> None:
            for inbox, items in batch:
                inbox.put_all(items)

        try:
            self._loop.call_soon_threadsafe(deliver_all)
        except RuntimeError:
            pass  # the loop is closed: nobody is listening any more

    def _finish(self, seq: _Sequence, item: object = _DONE, *, kv_valid: bool = True) -> None:
        """End `seq`; its slot keeps the KV of its prefilled prompt tokens,
        unless `kv_valid` is False.

        Generated tokens are not kept: llama.cpp writes slightly different KV
        values for a token decoded alone than for the same token inside a
        prefill chunk, so reusing them would let a cache hit change greedy
        output. The next turn prefills the previous answer again (the
        llama.cpp model trims the slot's extra cells in `begin`)."""
        seq.outbox.append(item)
        if seq.slot >= 0:
            keep = kv_valid and self._slots.enabled
            cached = seq.prompt[: seq.prefilled] if keep else []
            self._model.end(seq.slot, keep_kv=keep)
            self._slots.release(seq.slot, cached)
            seq.slot = -1

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._incoming or self._running or self._waiting):
                    self._cond.wait()
                if self._closed:
                    break
                self._waiting.extend(self._incoming)
                self._incoming.clear()
            touched: list[_Sequence] = []
            self._drop_cancelled(touched)
            self._admit(touched)
            if self._running:
                self._step(touched)
            self._flush(touched)
            if not self._running and self._waiting and not touched:
                # Nothing can run (cannot happen with valid settings); avoid a spin.
                time.sleep(0.001)
        for seq in [*self._running, *self._waiting, *self._incoming]:
            self._finish(seq, EngineError("engine is shut down"))
        self._flush([*self._running, *self._waiting, *self._incoming])

    def _drop_cancelled(self, touched: list[_Sequence]) -> None:
        if any(s.cancelled for s in self._waiting):
            self._waiting = collections.deque(s for s in self._waiting if not s.cancelled)
        kept = []
        for seq in self._running:
            if seq.cancelled:
                self._finish(seq)
                touched.append(seq)
            else:
                kept.append(seq)
        self._running = kept

    def _admit(self, touched: list[_Sequence]) -> None:
        if not self._waiting:
            self._waiting_steps = 0
            return
        s = self._s
        if self._running and self._waiting_steps < s.max_waiting_tokens:
            # TGI: a new batch joins a running one only when it is big enough.
            min_size = int(len(self._running) * s.waiting_served_ratio)
            if len(self._waiting) < min_size:
                self._waiting_steps += 1
                return
        used = sum(q.budget for q in self._running)
        admitted = 0
        slots = self._slots
        while self._waiting and len(self._running) < s.max_batch_size and slots.free():
            seq = self._waiting[0]
            if used + seq.budget > s.max_batch_total_tokens:
                break  # oldest first: later ones wait their turn too
            self._waiting.popleft()
            lease = slots.acquire(seq.prompt)
            seq.slot = lease.slot
            try:
                kept = self._model.begin(seq.slot, seq.prompt, seq.params, lease.reused)
            except Exception as exc:  # e.g. a grammar llama.cpp cannot parse
                logger.warning("sequence setup failed: %s", exc)
                self._finish(seq, exc, kv_valid=False)
                touched.append(seq)
                continue
            if kept < lease.reused:
                slots.shrink(seq.slot, kept)
            seq.prefilled = kept
            used += seq.budget
            seq.outbox.append(_Started(kept))
            self._running.append(seq)
            touched.append(seq)
            admitted += 1
        self._waiting_steps = 0 if admitted else self._waiting_steps + 1

    def _step(self, touched: list[_Sequence]) -> None:
        work: list[SlotWork] = []
        by_slot: dict[int, _Sequence] = {}
        for seq in self._running:
            if seq.prefilled == len(seq.prompt):
                pos = len(seq.prompt) + seq.generated - 1
                work.append(SlotWork(seq.slot, (seq.last_token,), pos, True))
                by_slot[seq.slot] = seq
        # Decode tokens in ascending slot order: llama.cpp splits a batch over
        # per-sequence KV streams into one compute pass per run of
        # consecutive sequence ids (llama_batch_allocr::split_equal), so
        # slots 3,1,0,2 would cost several passes where 0,1,2,3 costs one.
        work.sort(key=_slot_of)
        budget = self._s.max_batch_prefill_tokens
        for seq in self._running:
            if budget <= 0:
                break
            remaining = len(seq.prompt) - seq.prefilled
            if remaining == 0:
                continue
            n = min(remaining, budget)
            chunk = seq.prompt[seq.prefilled : seq.prefilled + n]
            last = n == remaining
            work.append(SlotWork(seq.slot, chunk, seq.prefilled, last))
            seq.prefilled += n
            budget -= n
            by_slot[seq.slot] = seq
        try:
            results = self._model.step(work)
        except Exception as exc:
            logger.exception("decode step failed")
            self._healthy = False
            for seq in self._running:
                self._finish(seq, exc, kv_valid=False)
                touched.append(seq)
            self._running = []
            return
        self._healthy = True
        self.steps += 1
        finished = set()
        for slot, result in results.items():
            seq = by_slot[slot]
            touched.append(seq)
            if isinstance(result, Exception):
                self._finish(seq, result, kv_valid=False)
                finished.add(id(seq))
                continue
            seq.generated += 1
            seq.last_token = result.id
            seq.outbox.append(result)
            self.tokens_out += 1
            if result.eos or seq.generated >= seq.params.max_new_tokens:
                self._finish(seq)
                finished.add(id(seq))
        if finished:
            self._running = [q for q in self._running if id(q) not in finished]
