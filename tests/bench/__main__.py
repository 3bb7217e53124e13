"""`make bench`: every benchmark, figures printed and saved.

    python -m tests.bench [--quick]

Runs the mesh benchmark (its cost hop by hop against a zero-delay TGI
double), SmolLM2 through the mesh versus llama.cpp in-process, and the CPU
backend's own prompt and generation tokens/s, then writes every figure, with the machine, to
.run/bench/results.json and the tables to .run/bench/results.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

from tests.bench import cpu_backend_bench, cpu_mesh_bench, mesh_bench

OUT = Path(__file__).resolve().parents[2] / ".run" / "bench"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    quick = "--quick" in sys.argv
    sys.argv = [sys.argv[0], *(["--quick"] if quick else []), "--json", str(OUT / "mesh.json")]
    text = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, text)):
        mesh_bench.main()
        print()
        sys.argv = [sys.argv[0], *(["--requests", "2"] if quick else [])]
        cpu = cpu_mesh_bench.main()
        print()
        # The CPU backend alone: prompt and generation tokens/s over HTTP.
        cpu_backend_bench.main()
    results = json.loads((OUT / "mesh.json").read_text())
    results["cpu_backend"] = cpu
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
