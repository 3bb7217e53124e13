"""`make bench`: every benchmark, figures printed and saved.

    python -m tests.bench [--quick] [--prefix]

Runs the mesh benchmark (its cost hop by hop against a lean zero-delay TGI
double, load from wrk), SmolLM2 through the mesh versus llama.cpp
in-process, and the CPU backend's own prompt and generation tokens/s, then
writes every figure to .run/bench/results.json (keys `mesh`, `cpu_mesh`,
`cpu_backend` when that bench returns figures, `replica_choice` (load-aware
against least-in-flight, simulated), `tracing` (off against on),
`resume_seam` (greedy streams resumed mid-stream against uninterrupted),
`relay` and `relay_bounded` (streams one router and adapter relay before
time to first token doubles; a burst of 3,000 against the router's bound),
`relay_bounded_envoy` (that burst through Envoy), `tenancy` (a saturated
model with and without the router's queue), `tools` (a chat request with
three function tools against none), and
`machine`: the machine
and its load average when the run began) and the tables to
.run/bench/results.md. `--prefix` adds the shared-prefix conversations
(tests/bench/prefix_bench.py, key `prefix`): the mesh's
round robin, load only and cache-aware choice over 4 TGI doubles modelling
a prefix cache and over 2 CPU backends, then vLLM's router (cache-aware and
round robin) and the mesh over the same two llama-cpp-python servers, every
run 8 conversations of 6 turns (`--quick`: 4 of 3); its plot goes to
.run/bench/prefix.png.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any

from tests.bench import (
    cpu_backend_bench,
    cpu_mesh_bench,
    mesh_bench,
    prefix_bench,
    relay_bench,
    replica_bench,
    resume_bench,
    tenancy_bench,
    tools_bench,
    tracing_bench,
)

OUT = Path(__file__).resolve().parents[2] / ".run" / "bench"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    quick = "--quick" in sys.argv
    prefix = "--prefix" in sys.argv
    sys.argv = [sys.argv[0], *(["--quick"] if quick else [])]
    text = io.StringIO()
    results: dict[str, Any] = {}
    with contextlib.redirect_stdout(_Tee(sys.stdout, text)):
        results["mesh"] = mesh_bench.main()
        print()
        sys.argv = [sys.argv[0], *(["--requests", "2"] if quick else [])]
        results["cpu_mesh"] = cpu_mesh_bench.main()
        print()
        # The CPU backend alone: prompt and generation tokens/s over HTTP.
        backend = cpu_backend_bench.main()
        if isinstance(backend, dict):
            results["cpu_backend"] = backend
        print()
        # Replica choice: load-aware against least-in-flight, simulated.
        sys.argv = [sys.argv[0]]
        results["replica_choice"] = replica_bench.main()
        print()
        # Tracing off against on (exporting to a local OTLP receiver).
        sys.argv = [sys.argv[0], *(["--quick", "--runs", "1"] if quick else [])]
        results["tracing"] = tracing_bench.main()
        print()
        # A greedy stream resumed mid-stream against the uninterrupted one.
        results["resume_seam"] = resume_bench.main(["--prompts", "10" if quick else "50"])
        print()
        # Streams one router and one adapter relay before TTFT doubles; then
        # a burst of 3,000 streams against the router's default bound.
        results["relay"] = relay_bench.main(
            ["--levels", "1,50,100,200" if quick else "1,50,100,200,400,800,1600"])
        print()
        results["relay_bounded"] = relay_bench.main(
            ["--levels", "1,3000", "--router-bound", "256"])
        print()
        # The same burst through Envoy, whose limits sit just above the bound.
        results["relay_bounded_envoy"] = relay_bench.main(
            ["--levels", "1,3000", "--router-bound", "256", "--via-envoy"])
        print()
        # Tenants on a saturated model: with and without the router's queue.
        sys.argv = [sys.argv[0], *(["--quick"] if quick else [])]
        results["tenancy"] = tenancy_bench.main()
        if prefix:
            print()
            # Conversations sharing long prefixes, by routing policy.
            results["prefix"] = prefix_bench.main(
                ["--doubles", "--cpu", "--anchor", "--plot", str(OUT / "prefix.png"),
                 *(["--quick"] if quick else [])])
        print()
        # Tools on the OpenAI path: three function tools against none.
        sys.argv = [sys.argv[0], *(["--quick"] if quick else [])]
        results["tools"] = tools_bench.main()
    results["machine"] = results["mesh"].pop("machine")
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    (OUT / "results.md").write_text(text.getvalue())
    print(f"\nfigures: {OUT / 'results.json'}, tables: {OUT / 'results.md'}")


class _Tee(io.TextIOBase):
    def __init__(self, *streams: io.TextIOBase | object) -> None:
        self._streams = streams

    def write(self, s: str) -> int:
        for stream in self._streams:
            stream.write(s)  # type: ignore[attr-defined]
        return len(s)

    def flush(self) -> None:
        for stream in self._streams:
            stream.flush()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
