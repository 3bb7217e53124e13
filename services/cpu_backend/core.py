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
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
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


async def _close_cancelled(events: AsyncIterator[Any]) -> None:
    """End a dropped generation: the engine sees a cancellation, not a normal close."""
    athrow = getattr(events, "athrow", None)
    if athrow is not None:
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, RuntimeError):
            await athrow(asyncio.CancelledError())


class _Watch:
    """Watches one request's client from a timer on the event loop.

    Every `poll` seconds: when the client is gone, the task driving the
    request is cancelled (`drive` turns that into ClientGone); when no token
    came since the last look and nothing is being written, `on_idle` runs
    (SSE keep-alives) in a task of its own.
    """

    def __init__(
        self,
        task: asyncio.Task[Any] | None,
        client_gone: Callable[[], bool],
        on_idle: Callable[[], Awaitable[None]] | None,
        poll: float,
    ) -> None:
        self._task = task
        self._client_gone = client_gone
        self._on_idle = on_idle
        self._poll = poll
        self._idle_task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(poll, self._tick)
        # True once the client was found gone and the task cancelled for it.
        self.gone = False
        # Set by `drive` while it writes an event, and after each token.
        self.writing = False
        self.active = False

    def _tick(self) -> None:
        self._handle = None
        if self._task is None or self._task.done():
            return
        if self._client_gone():
            self._cancel()
            return
        idle = not self.active and not self.writing
        self.active = False
        if idle and self._on_idle is not None and self._idle_task is None:
            self._idle_task = self._loop.create_task(self._idle(self._on_idle))
        self._handle = self._loop.call_later(self._poll, self._tick)

    def _cancel(self) -> None:
        if self._task is not None and not self.gone:
            self.gone = True
            self._task.cancel()

    async def _idle(self, on_idle: Callable[[], Awaitable[None]]) -> None:
        try:
            await on_idle()
        except ConnectionError:
            self._cancel()
        except Exception:
            logger.exception("idle callback failed")
        finally:
            self._idle_task = None

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._idle_task is not None:
            self._idle_task.cancel()


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
    ) -> AsyncGenerator[tuple[Token, int, Generation | None], None]:
        """Engine tokens with TGI's stopping criteria: (token, index, final-or-None)."""
        gen = Generation()
        m = self.metrics
        budget = valid.input_length + valid.sampling.max_new_tokens
        max_new_tokens = valid.sampling.max_new_tokens
        stops = valid.stop
        m.queue_size.inc()
        queued = True

        def on_start(cached_tokens: int = 0) -> None:
            nonlocal queued
            clock.mark_started()
            if queued:
                queued = False
                gen.cached_tokens = cached_tokens
                m.prefix_cache(valid.input_length, cached_tokens)
                m.queue_size.dec()
                m.batch_current_size.inc()
                self._running_tokens += budget
                m.batch_current_max_tokens.set(self._running_tokens)

        tokens = self.engine.generate_tokens(valid.input_ids, valid.sampling, on_start=on_start)
        try:
            async for token in tokens:
                if queued:
                    on_start()  # for engines that never call it
                gen.tokens.append(token)
                index = len(gen.tokens)
                added = 0
                if not token.special:
                    gen.text += token.text
                    added = len(token.text)
                # TGI's StoppingCriteria order: length, then EOS, then stop.
                if index >= max_new_tokens:
                    gen.finish_reason = "length"
                elif token.eos:
                    gen.finish_reason = "eos_token"
                elif stops and _stop_hit(gen.text, added, stops):
                    gen.finish_reason = "stop_sequence"
                else:
                    yield token, index, None
                    continue
                yield token, index, gen
                return
        except asyncio.CancelledError:
            # The request was dropped while the engine's iterator sat at a
            # token it had yielded: the engine sees a cancellation, exactly
            # as when the task awaiting it is cancelled.
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                athrow = getattr(tokens, "athrow", None)
                if athrow is not None:
                    await athrow(asyncio.CancelledError())
            raise
        finally:
            # Closing the engine's iterator is what stops the model: on a stop
            # sequence here, on cancellation when the client went away.
            aclose = getattr(tokens, "aclose", None)
            if aclose is not None:
                await aclose()
            if queued:
                m.queue_size.dec()
            else:
                m.batch_current_size.dec()
                self._running_tokens -= budget
                m.batch_current_max_tokens.set(self._running_tokens)
        # The engine stopped without EOS, stop sequence or length.
        raise InferError.incomplete(stream=False)

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
        dropped). In every case the generation is cancelled on exit.

        The calling task iterates the engine itself: a token wakes this one
        task, which applies the stopping criteria and calls `on_event` at
        once. The client is watched from a timer on the event loop, not per
        token: when it is gone the task is cancelled, wherever it waits.
        """
        events = self._events(valid, clock)
        watch = _Watch(
            asyncio.current_task(), client_gone, on_idle, self.settings.disconnect_poll_interval
        )
        try:
            while True:
                try:
                    token, index, final = await anext(events)
                except InferError as exc:
                    self.record_failure(exc)
                    raise
                except EngineError as exc:
                    error = InferError.generation(str(exc))
                    self.record_failure(error)
                    raise error from exc
                except (asyncio.CancelledError, ClientGone):
                    raise
                except Exception as exc:
                    logger.exception("engine failed")
                    error = InferError.generation(f"{type(exc).__name__}: {exc}")
                    self.record_failure(error)
                    raise error from exc
                watch.writing = True
                await on_event(token, index, final)
                watch.writing = False
                watch.active = True
                if final is not None:
                    return final
        except asyncio.CancelledError:
            self.metrics.failure("dropped")
            await _close_cancelled(events)
            task = asyncio.current_task()
            if watch.gone and task is not None:
                # Our own cancellation, for a client found gone: not the caller's.
                task.uncancel()
                raise ClientGone() from None
            raise
        except (ClientGone, ConnectionError):
            self.metrics.failure("dropped")
            await _close_cancelled(events)
            raise
        finally:
            watch.stop()
            await events.aclose()

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
