"""`make bench`: every benchmark, figures printed and saved.

    python -m tests.bench [--quick]

Runs the mesh benchmark (its cost hop by hop against a lean zero-delay TGI
double, load from wrk), SmolLM2 through the mesh versus llama.cpp
in-process, and the CPU backend's own prompt and generation tokens/s, then
writes every figure to .run/bench/results.json (keys `mesh`, `cpu_mesh`,
`cpu_backend` when that bench returns figures, `replica_choice` (load-aware
against least-in-flight, simulated), `tracing` (off against on), `tools` (a chat
request with three function tools against none), and `machine`: the machine
and its load average when the run began) and the tables to
.run/bench/results.md.
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
    replica_bench,
    tools_bench,
    tracing_bench,
)

OUT = Path(__file__).resolve().parents[2] / ".run" / "bench"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    quick = "--quick" in sys.argv
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
