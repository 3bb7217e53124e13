"""The transport-free core of the TGI API: admission, validation, generation, metrics.

`TgiCore` is what TGI's router does between the HTTP handler and the
batcher: checks made before admission, the concurrency permit
(`--max-concurrent-requests`: requests waiting or running; 429 beyond it),
validation, stopping criteria on top of the engine's tokens, best_of, and
TGI's metrics. It knows nothing about aiohttp: the routes hand it callbacks
to emit events and to ask whether the client is still there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from services.cpu_backend.engine import Engine, EngineError, Token
from services.cpu_backend.errors import InferError
from services.cpu_backend.metrics import Metrics
from services.cpu_backend.responses import Generation
from services.cpu_backend.schema import GenerateRequest
from services.cpu_backend.settings import ServerSettings
from services.cpu_backend.validation import Validator, ValidRequest

logger = logging.getLogger("llmmesh.cpu_backend.core")


class ClientGone(Exception):
    """The client closed its connection before the reply was complete."""


class ConcurrencyLimiter:
    """TGI's semaphore with try_acquire: never waits, the caller answers 429.

    A permit covers a request from admission to its end, queued or running,
    so the waiting queue in front of the batch is bounded by `capacity`.
    """

    def __init__(self, capacity: int) -> None:
        # Mutable on purpose: the test double shrinks it to 0 to force 429s.
        self.capacity = capacity
        self.in_use = 0

    def try_acquire(self, n: int = 1) -> bool:
        if self.in_use + n > self.capacity:
            return False
        self.in_use += n
        return True

    def release(self, n: int = 1) -> None:
        self.in_use -= n


@dataclass
class Clock:
    """TGI's timestamps of one request (monotonic seconds)."""

    start: float
    # Validation finished, request entered the queue.
    queued: float | None = None
    # The engine started working on it.
    started: float | None = None

    def mark_started(self) -> None:
        if self.started is None:
            self.started = time.monotonic()

    def timings(self, generated_tokens: int) -> dict[str, float]:
        end = time.monotonic()
        queued = self.queued if self.queued is not None else end
        started = self.started if self.started is not None else queued
        inference = end - started
        return {
            "total": end - self.start,
            "validation": queued - self.start,
            "queue": started - queued,
            "inference": inference,
            "per_token": inference / max(generated_tokens, 1),
        }


def _stop_hit(text: str, added: int, stops: tuple[str, ...]) -> bool:
    """TGI's StopSequenceCriteria, for a stop that ends inside the newest text."""
    for stop in stops:
        # TGI compiles `re.escape(stop) + "$"`; for "" that matches at once.
        if not stop:
            return True
        if added and stop in text[-(added + len(stop) - 1) :]:
            return True
    return False


class TgiCore:
    """Admission, validation, generation and metrics of one served model.

    Knows nothing about aiohttp: the routes hand it callbacks to emit events
    and to ask whether the client is still there.
    """

    def __init__(self, engine: Engine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = Metrics(
            max_input_tokens=settings.max_input_tokens,
            max_total_tokens=settings.max_total_tokens,
        )
        self.limiter = ConcurrencyLimiter(settings.max_concurrent_requests)
        self.validator = Validator(settings, engine.tokenize)
        # Set on SIGTERM: /health turns 503 while in-flight requests finish.
        self.draining = False
        self._running_tokens = 0

    def info(self) -> dict[str, Any]:
        s = self.settings
        return {
            "model_id": s.model_id,
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": s.max_concurrent_requests,
            "max_best_of": s.max_best_of,
            "max_stop_sequences": s.max_stop_sequences,
            "max_input_tokens": s.max_input_tokens,
            "max_total_tokens": s.max_total_tokens,
            "validation_workers": s.validation_workers,
            "max_client_batch_size": s.max_client_batch_size,
            "router": s.router,
            "version": s.version,
            "sha": None,
            "docker_label": None,
        }

    async def healthy(self) -> bool:
        return not self.draining and await self.engine.health()

    def admit(self, request: GenerateRequest, *, stream: bool) -> int:
        """Checks before a permit, then the permits; the caller must `release(n)`.

        Returns how many permits were taken: one per sequence, so best_of=2
        takes two, as TGI's router does (one generate call per sequence).
        Like every TgiCore step, failures are counted here, once, by their
        error-table label; callers only render them.
        """
        try:
            self.validator.check_before_admission(request.parameters, stream=stream)
            n = 1 if stream else max(request.parameters.best_of or 1, 1)
            if not self.limiter.try_acquire(n):
                raise InferError.overloaded()
        except InferError as exc:
            self.record_failure(exc)
            raise
        return n

    def release(self, n: int = 1) -> None:
        self.limiter.release(n)

    async def validate(self, request: GenerateRequest, *, compat: bool) -> ValidRequest:
        default_full_text = self.settings.compat_return_full_text if compat else False
        try:
            valid = await self.validator.validate(
                request, default_return_full_text=default_full_text
            )
        except InferError as exc:
            self.record_failure(exc)
            raise
        self.metrics.input_length.observe(valid.input_length)
        self.metrics.max_new_tokens.observe(valid.max_new_tokens)
        return valid

    def record_failure(self, error: InferError) -> None:
        self.metrics.failure(error.spec.metric_label)

    def record_success(self, clock: Clock, gen: Generation) -> dict[str, float]:
        t = clock.timings(len(gen.tokens))
        m = self.metrics
        m.success()
        m.request_duration.observe(t["total"])
        m.validation_duration.observe(t["validation"])
        m.queue_duration.observe(t["queue"])
        m.inference_duration.observe(t["inference"])
        m.mean_time_per_token.observe(t["per_token"])
        m.generated_tokens.observe(len(gen.tokens))
        return t

    async def _events(
        self, valid: ValidRequest, clock: Clock
    ) -> AsyncIterator[tuple[Token, int, Generation | None]]:
        """Engine tokens with TGI's stopping criteria: (token, index, final-or-None)."""
        gen = Generation()
        m = self.metrics
        budget = valid.input_length + valid.sampling.max_new_tokens
        m.queue_size.inc()
        state = {"queued": True}

        def on_start() -> None:
            clock.mark_started()
            if state["queued"]:
                state["queued"] = False
                m.queue_size.dec()
                m.batch_current_size.inc()
                self._running_tokens += budget
                m.batch_current_max_tokens.set(self._running_tokens)

        tokens = self.engine.generate_tokens(valid.input_ids, valid.sampling, on_start=on_start)
        try:
            async for token in tokens:
                on_start()  # for engines that never call it
                gen.tokens.append(token)
                index = len(gen.tokens)
                added = 0
                if not token.special:
                    gen.text += token.text
                    added = len(token.text)
                # TGI's StoppingCriteria order: length, then EOS, then stop.
                if index >= valid.sampling.max_new_tokens:
                    gen.finish_reason = "length"
                elif token.eos:
                    gen.finish_reason = "eos_token"
                elif valid.stop and _stop_hit(gen.text, added, valid.stop):
                    gen.finish_reason = "stop_sequence"
                else:
                    yield token, index, None
                    continue
                yield token, index, gen
                return
        finally:
            # Closing the engine's iterator is what stops the model: on a stop
            # sequence here, on cancellation when the client went away.
            aclose = getattr(tokens, "aclose", None)
            if aclose is not None:
                await aclose()
            if state["queued"]:
                m.queue_size.dec()
            else:
                m.batch_current_size.dec()
                self._running_tokens -= budget
                m.batch_current_max_tokens.set(self._running_tokens)
        # The engine stopped without EOS, stop sequence or length.
        raise InferError.incomplete(stream=False)

    async def _produce(self, valid: ValidRequest, clock: Clock, queue: asyncio.Queue) -> None:
        try:
            async for item in self._events(valid, clock):
                queue.put_nowait(item)
        except InferError as exc:
            queue.put_nowait(exc)
        except EngineError as exc:
            queue.put_nowait(InferError.generation(str(exc)))
        except Exception as exc:
            logger.exception("engine failed")
            queue.put_nowait(InferError.generation(f"{type(exc).__name__}: {exc}"))

    async def drive(
        self,
        valid: ValidRequest,
        clock: Clock,
        on_event: Callable[[Token, int, Generation | None], Awaitable[None]],
        client_gone: Callable[[], bool],
        on_idle: Callable[[], Awaitable[None]] | None = None,
    ) -> Generation:
        """Run one generation to its end, or until the client disappears.

        Raises InferError for generation/incomplete errors (already counted)
        and ClientGone (or CancelledError) when the client left (counted as
        dropped). In every case the generation task is cancelled on exit.
        """
        queue: asyncio.Queue[Any] = asyncio.Queue()
        producer = asyncio.create_task(self._produce(valid, clock, queue))
        poll = self.settings.disconnect_poll_interval
        next_check = time.monotonic() + poll
        try:
            while True:
                # Checked on a clock, not only when idle: a unary request whose
                # tokens keep coming writes nothing that could fail.
                now = time.monotonic()
                if now >= next_check:
                    if client_gone():
                        raise ClientGone()
                    next_check = now + poll
                if queue.empty():
                    try:
                        item = await asyncio.wait_for(queue.get(), timeout=next_check - now)
                    except TimeoutError:
                        if on_idle is not None:
                            await on_idle()
                        continue
                else:
                    item = queue.get_nowait()
                if isinstance(item, InferError):
                    self.record_failure(item)
                    raise item
                token, index, final = item
                await on_event(token, index, final)
                if final is not None:
                    return final
        except (ClientGone, ConnectionError, asyncio.CancelledError):
            self.metrics.failure("dropped")
            raise
        finally:
            # Cancelling the task closes the engine iterator at its current
            # await; the engine then stops at its next token.
            producer.cancel()
            await asyncio.wait({producer}, timeout=1.0)

    async def drive_best_of(
        self,
        valid: ValidRequest,
        n: int,
        clock: Clock,
        client_gone: Callable[[], bool],
    ) -> list[tuple[ValidRequest, Generation]]:
        """TGI's generate_best_of: n sampled sequences side by side, best first.

        Each sequence has its own random seed; the best is the one with the
        highest mean token log-probability (router/src/infer/mod.rs).
        """
        valids = [valid]
        for _ in range(n - 1):
            seed = self.validator.random_seed()
            valids.append(
                replace(valid, sampling=replace(valid.sampling, seed=seed), reported_seed=seed)
            )

        async def ignore(_t: Token, _i: int, _f: Generation | None) -> None:
            return None

        tasks = [asyncio.ensure_future(self.drive(v, clock, ignore, client_gone)) for v in valids]
        try:
            gens = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        results = list(zip(valids, gens, strict=True))
        best = max(range(n), key=lambda i: results[i][1].mean_logprob())
        return [results[best], *(r for i, r in enumerate(results) if i != best)]
