"""What tools cost the OpenAI path: a chat request offering three tools
against the same request with none, through the whole mesh.

    python -m tests.bench.tools_bench [--runs 3] [--quick] [--json out.json]

Starts two lean TGI doubles (tools/lean_tgi_double.py) and the mesh
(launcher: adapters, router with its OpenAI face, Envoy) on free loopback
ports, then loads `POST /v1/chat/completions` through Envoy from wrk at
concurrency 32, unary and streamed, with and without three function tools
(`tool_choice` auto: the tools are checked, rendered into the prompt in
Qwen's format, and the output is read for calls). The figure is the CPU
milliseconds each process spends per successful request (from /proc), and
what the tools add to the router's (OpenAI face) and the adapter's. Modes
alternate (none, tools, none, tools, ...); figures are medians of --runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from tests.bench.mesh_bench import (
    PROMPT,
    TOKENS,
    HTTPPath,
    Load,
    processes,
    start_lean_doubles,
    wrk,
)
from tests.harness.mesh import start_mesh, stop_mesh
from tests.harness.procs import stop


def _tool(name: str, description: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties,
                       "required": list(properties)}}}


TOOLS = [
    _tool("get_weather", "The current weather in a city.",
          {"city": {"type": "string"}, "unit": {"type": "string",
                                                "enum": ["celsius", "fahrenheit"]}}),
    _tool("search_flights", "Flights between two airports on a day.",
          {"origin": {"type": "string"}, "destination": {"type": "string"},
           "date": {"type": "string", "format": "date"}}),
    _tool("convert_currency", "An amount in another currency.",
          {"amount": {"type": "number"}, "from": {"type": "string"},
           "to": {"type": "string"}}),
]


def paths(stream: bool) -> dict[str, HTTPPath]:
    base = {"model": "qwen2", "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": TOKENS}
    fields = (("finish_reason", '"length"'),)
    if stream:
        base["stream"] = True
    else:
        fields += (("completion_tokens", str(TOKENS)),)
    kind = "streamed" if stream else "unary"
    return {
        "none": HTTPPath(f"{kind}, no tools", "/v1/chat/completions", base, fields),
        "3 tools": HTTPPath(f"{kind}, 3 tools", "/v1/chat/completions",
                            {**base, "tools": TOOLS, "tool_choice": "auto"}, fields),
    }


def measure(url: str, pids: dict[str, int], runs: int, seconds: float,
            script_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stream in (False, True):
        modes = paths(stream)
        loads: dict[str, list[Load]] = {mode: [] for mode in modes}
        for path in modes.values():
            wrk(url, path, 32, 1, pids, script_dir)  # warm-up
        for _ in range(runs):
            for mode, path in modes.items():
                loads[mode].append(wrk(url, path, 32, seconds, pids, script_dir))
        kind = "streamed" if stream else "unary"
        rows = {}
        for mode, got in loads.items():
            cpu = {name: round(statistics.median(x.cpu_ms[name] for x in got), 3)
                   for name in got[0].cpu_ms}
            rows[mode] = {
                "successes_per_s": round(statistics.median(x.rps for x in got), 1),
                "failures": sum(x.failures for x in got),
                "cpu_ms_per_request": cpu,
                "mesh_cpu_ms_per_request": round(sum(
                    v for k, v in cpu.items() if not k.startswith(("double", "wrk"))), 3),
            }
        none, tools = rows["none"], rows["3 tools"]
        rows["added_by_tools_ms"] = {
            name: round(tools["cpu_ms_per_request"][name] - none["cpu_ms_per_request"][name], 3)
            for name in ("router", "adapter-qwen2")
        } | {"mesh": round(tools["mesh_cpu_ms_per_request"]
                           - none["mesh_cpu_ms_per_request"], 3)}
        out[kind] = rows
    return out


def report(results: dict[str, Any]) -> str:
    over = f"medians of {results['runs']} runs" if results["runs"] > 1 else "one run"
    lines = [f"## Tools on the OpenAI path (wrk, concurrency 32, {TOKENS}-token replies; "
             f"{over})", "",
             "| request | successes/s | failures | CPU ms per request: router, adapter, "
             "mesh total |", "|---|---|---|---|"]
    for kind in ("unary", "streamed"):
        for mode in ("none", "3 tools"):
            row = results[kind][mode]
            cpu = row["cpu_ms_per_request"]
            lines.append(f"| {kind}, {mode} | {row['successes_per_s']:.0f} | "
                         f"{row['failures']} | {cpu['router']:.2f}, "
                         f"{cpu['adapter-qwen2']:.2f}, {row['mesh_cpu_ms_per_request']:.2f} |")
    for kind in ("unary", "streamed"):
        added = results[kind]["added_by_tools_ms"]
        lines.append(f"\n{kind}: three tools add {added['router']:+.2f} ms CPU in the router, "
                     f"{added['adapter-qwen2']:+.2f} ms in the adapter, "
                     f"{added['mesh']:+.2f} ms over the mesh, per request")
    return "\n".join(lines)


def main() -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0, help="wrk's duration per run")
    p.add_argument("--quick", action="store_true", help="one short run, for a smoke test")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: make wrk (Debian package wrk)")
    if args.quick:
        args.runs, args.seconds = 1, 2.0
    with tempfile.TemporaryDirectory(prefix="llmmesh-tools-bench-") as tmp:
        doubles = start_lean_doubles(Path(tmp))
        try:
            mesh = start_mesh(Path(tmp), doubles)
            try:
                results = measure(mesh.http, processes(mesh), args.runs, args.seconds,
                                  Path(tmp))
            finally:
                stop_mesh(mesh)
        finally:
            for double in doubles.values():
                stop(double.proc)
    results["runs"] = args.runs
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nfigures: {args.json}")
    return results


if __name__ == "__main__":
    main()
