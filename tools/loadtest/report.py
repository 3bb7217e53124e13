"""How results are shown: a table on the terminal, JSON, and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tools.loadtest import engine_metrics


def _q(dist: dict[str, float] | None, key: str) -> str:
    if not dist:
        return "-"
    value = dist[key]
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def table(results: dict[str, Any]) -> str:
    """One row per step and model; latencies in ms as p50/p90/p99."""
    slo = results["settings"].get("slo") or {}
    head = ("| step | model | ok/sent | 429s | errors | req/s | out tok/s | TTFT p50/p90/p99 "
            "| TPOT p50/p90/p99 | ITL p50/p99 | E2E p50/p90/p99 | goodput req/s "
            "| cache hits |")
    lines = [head, "|" + "---|" * 13]
    for step in results["steps"]:
        for model, s in step["models"].items():
            errors = ", ".join(f"{k} x{v}" for k, v in s["errors"].items()) or "-"
            lat = [
                "/".join(_q(s[k], p) for p in ("p50", "p90", "p99"))
                for k in ("ttft_ms", "tpot_ms")
            ]
            itl = "/".join(_q(s["itl_ms"], p) for p in ("p50", "p99"))
            e2e = "/".join(_q(s["e2e_ms"], p) for p in ("p50", "p90", "p99"))
            good = f"{s['goodput']:.2f}" if slo else "-"
            lines.append(
                f"| {step['label']} | {model} | {s['successes']}/{s['requests']} | "
                f"{s['rate_limited']} | {errors} | {s['request_throughput']:.2f} | "
                f"{s['output_token_throughput']:.1f} | {lat[0]} | {lat[1]} | {itl} | {e2e} | "
                f"{good} | {engine_metrics.shown(step.get('cache'))} |")
    turns = [
        f"{step['label']}: TTFT p50/p90 by turn: " + ", ".join(
            f"{turn}: {_q(t['ttft_ms'], 'p50')}/{_q(t['ttft_ms'], 'p90')}"
            for turn, t in step["turns"].items())
        for step in results["steps"] if step.get("turns")
    ]
    if turns:
        lines += ["", *turns]
    notes = ["latencies in ms (nearest-rank percentiles of successful requests)",
             "cache hits: the share of prompt tokens the engines served from their prefix "
             "caches during the step, from their /metrics (--cache-metrics; n/a: not reported)"]
    if slo:
        notes.append("goodput: successes within " + ", ".join(
            f"{k.removesuffix('_ms').upper()} <= {v:g} ms" for k, v in slo.items()))
    return "\n".join([*lines, "", *notes])


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def _x(step: dict[str, Any], figures: dict[str, Any]) -> float:
    """Offered load: the step's rate or concurrency; at rate inf, what was achieved."""
    value = float(step["value"])
    return figures["request_throughput"] if math.isinf(value) else value


def _axis(ax: Any, title: str, xlabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def plot(results: dict[str, Any], path: Path, title: str | None = None) -> None:
    """Latency percentiles and throughput/goodput against offered load, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = results["steps"]
    mode = steps[0]["mode"] if steps else "concurrency"
    xlabel = "offered load: requests/s" if mode == "rate" else "offered load: concurrent requests"
    models = sorted({m for s in steps for m in s["models"]} - {"all"})
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=90)
    panels = [(axes[0][0], "ttft_ms", "time to first token (ms)"),
              (axes[0][1], "tpot_ms", "time per output token (ms)"),
              (axes[1][0], "e2e_ms", "end-to-end latency (ms)")]
    styles = {"p50": "-", "p90": "--", "p99": ":"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, label in panels:
        for i, model in enumerate(models):
            for q, style in styles.items():
                xs, ys = [], []
                for step in steps:
                    s = step["models"].get(model)
                    if s and s[key]:
                        xs.append(_x(step, s))
                        ys.append(s[key][q])
                if xs:
                    ax.plot(xs, ys, style, marker="o", markersize=3,
                            color=colors[i % len(colors)])
        _axis(ax, label, xlabel)
    # One key for the three latency panels: a color per model, a line per percentile.
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[i % len(colors)], lw=3, label=model)
               for i, model in enumerate(models)]
    handles += [Line2D([], [], color="black", ls=style, label=q) for q, style in styles.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
               frameon=False)
    ax = axes[1][1]
    slo = results["settings"].get("slo") or {}
    for i, model in enumerate(models):
        pts = [(_x(st, st["models"][model]), st["models"][model]) for st in steps
               if model in st["models"]]
        color = colors[i % len(colors)]
        ax.plot([x for x, _ in pts], [s["request_throughput"] for _, s in pts], "-",
                marker="o", markersize=3, color=color, label=f"{model} throughput")
        if slo:
            ax.plot([x for x, _ in pts], [s["goodput"] for _, s in pts], "--", marker="s",
                    markersize=3, color=color, label=f"{model} goodput")
        rejected = [(x, s["rate_limited"] / max(1.0, s["duration_s"])) for x, s in pts]
        if any(y for _, y in rejected):
            ax.plot([x for x, _ in rejected], [y for _, y in rejected], ":", marker="x",
                    color=color, label=f"{model} 429s/s")
    _axis(ax, "requests/s" + (" (goodput: within the SLOs)" if slo else ""), xlabel)
    settings = results["settings"]
    fig.suptitle(title or f"llmmesh load test: {settings['api']} API, {settings['url']}",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
