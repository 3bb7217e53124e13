"""From records to figures: percentiles, throughput, errors and goodput.

Definitions (those of vLLM's serving benchmark and GenAI-Perf):
- TTFT: send to the first content; E2E: send to the end of the stream;
- TPOT: (E2E - TTFT) / (output tokens - 1), per request;
- ITL: the gap between successive chunks of a stream (a chunk may carry
  several tokens when the server sends tokens that arrived together);
- request and output-token throughput: successes, and the output tokens of
  successes, over the step's duration (first send to last end);
- goodput: successes that met every SLO given, per second.
Percentiles are nearest-rank: the smallest value with at least q% of the
samples at or below it, so every reported figure is one that was measured.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tools.loadtest.clients import Record

QUANTILES = (50, 90, 95, 99)


def nearest_rank(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0 < q <= 100) by the nearest-rank method."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def distribution_ms(samples: Sequence[float]) -> dict[str, float] | None:
    """mean and p50/p90/p95/p99 of seconds, in milliseconds; None without samples."""
    if not samples:
        return None
    out = {"mean": round(sum(samples) / len(samples) * 1000, 3)}
    for q in QUANTILES:
        out[f"p{q}"] = round(nearest_rank(samples, q) * 1000, 3)
    return out


@dataclass(frozen=True)
class SLO:
    """Upper bounds in milliseconds; None: not checked."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def met(self, record: Record) -> bool:
        if not record.ok:
            return False
        checks = (("ttft", self.ttft_ms, record.ttft), ("tpot", self.tpot_ms, record.tpot),
                  ("e2e", self.e2e_ms, record.e2e))
        for name, bound, value in checks:
            if bound is None:
                continue
            if value is None:
                if name == "tpot":
                    continue  # a one-token reply has no time per output token
                return False
            if value * 1000 > bound:
                return False
        return True

    def describe(self) -> dict[str, float]:
        return {k: v for k, v in (("ttft_ms", self.ttft_ms), ("tpot_ms", self.tpot_ms),
                                  ("e2e_ms", self.e2e_ms)) if v is not None}


def summarize(records: Sequence[Record], slo: SLO, duration: float | None = None) -> dict[str, Any]:
    """Every figure of one group of records (one model, or all, in one step)."""
    ok = [r for r in records if r.ok]
    if duration is None:
        duration = (max(r.end for r in records) - min(r.start for r in records)) if records else 0.0
    per_s = (lambda n: round(n / duration, 3)) if duration > 0 else (lambda n: 0.0)
    errors = Counter(r.error or "no finish reason" for r in records if not r.ok)
    output = sum(r.output_tokens for r in ok)
    inputs = [r.input_tokens for r in ok if r.input_tokens is not None]
    good = sum(1 for r in ok if slo.met(r))
    itls = [gap for r in ok for gap in r.itls()]
    return {
        "requests": len(records),
        "successes": len(ok),
        "failures": len(records) - len(ok),
        "rate_limited": sum(1 for r in records if r.rate_limited),
        "errors": dict(errors.most_common()),
        "duration_s": round(duration, 3),
        "request_throughput": per_s(len(ok)),
        "output_token_throughput": per_s(output),
        "output_tokens": output,
        "mean_output_tokens": round(output / len(ok), 2) if ok else None,
        "mean_input_tokens": round(sum(inputs) / len(inputs), 2) if inputs else None,
        "ttft_ms": distribution_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": distribution_ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": distribution_ms(itls),
        "e2e_ms": distribution_ms([r.e2e for r in ok]),
        "goodput": per_s(good),
        "good_requests": good,
        "good_fraction": round(good / len(records), 4) if records else None,
    }


def by_model(records: Sequence[Record], slo: SLO) -> dict[str, dict[str, Any]]:
    """Figures per model, and for all models together when there are several.

    Every group is divided by the step's whole duration, so the throughput of
    the models adds up to the step's.
    """
    if not records:
        return {}
    duration = max(r.end for r in records) - min(r.start for r in records)
    models = sorted({r.model for r in records})
    out = {m: summarize([r for r in records if r.model == m], slo, duration) for m in models}
    if len(models) > 1:
        out["all"] = summarize(records, slo, duration)
    return out


def by_turn(records: Sequence[Record]) -> dict[str, dict[str, Any]]:
    """Time to first token per turn of the conversations (shared-prefix
    workload), all models together: a warm prefix cache shows as later turns
    reaching their first token sooner than the first, though their prompts
    are longer. Empty when the records carry no turns."""
    turns = sorted({r.turn for r in records if r.turn is not None})
    out = {}
    for turn in turns:
        group = [r for r in records if r.turn == turn]
        ok = [r for r in group if r.ok]
        inputs = [r.input_tokens for r in ok if r.input_tokens is not None]
        out[str(turn)] = {
            "requests": len(group), "successes": len(ok),
            "mean_input_tokens": round(sum(inputs) / len(inputs), 2) if inputs else None,
            "ttft_ms": distribution_ms([r.ttft for r in ok if r.ttft is not None]),
        }
    return out


def per_request(record: Record, t0: float) -> dict[str, Any]:
    """One request's figures for the JSON; times in ms, `sent_ms` from the step's start."""
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    return {"model": record.model, "sent_ms": ms(record.start - t0), "ok": record.ok,
            "error": record.error, "ttft_ms": ms(record.ttft), "tpot_ms": ms(record.tpot),
            "e2e_ms": ms(record.e2e), "output_tokens": record.output_tokens,
            "input_tokens": record.input_tokens, "chunks": len(record.chunks),
            "turn": record.turn}
