"""Regenerate gen/ from protos/: Python stubs and Envoy's descriptor set.

`python scripts/gen.py` writes the files; `python scripts/gen.py --check`
generates into a scratch folder and fails when the committed files differ.
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GOOGLEAPIS = PROTOS / "third_party" / "googleapis"
WELL_KNOWN = Path(grpc_tools.__file__).parent / "_proto"
SOURCES = ["llmmesh/v1/generate.proto"]
# Envoy's transcoder renders rich error details only when their types are in
# the descriptor set, so google.rpc's protos go in beside the contract.
DESCRIPTOR_EXTRA = ["google/rpc/error_details.proto", "google/rpc/status.proto"]
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _protoc(*args: str) -> None:
    include = [f"-I{PROTOS}", f"-I{GOOGLEAPIS}", f"-I{WELL_KNOWN}"]
    code = protoc.main(["protoc", *include, *args])
    if code != 0:
        sys.exit(f"protoc failed ({code}) on {' '.join(args)}")


def generate(out: Path) -> None:
    python_out = out / "python"
    python_out.mkdir(parents=True, exist_ok=True)
    _protoc(
        f"--python_out={python_out}",
        f"--pyi_out={python_out}",
        f"--grpc_python_out={python_out}",
        *SOURCES,
    )
    _protoc(
        f"--descriptor_set_out={out / 'llmmesh.binpb'}",
        "--include_imports",
        *SOURCES,
        *DESCRIPTOR_EXTRA,
    )


def ignored_by_git(root: Path, paths: list[Path]) -> set[Path]:
    """Those of `paths` (relative to `root`) that git ignores: build output of
    `pip install ./gen/python`, say. None outside a git checkout."""
    if not paths:
        return set()
    try:
        done = subprocess.run(
            ["git", "check-ignore", "-z", "--stdin"],
            input="\0".join(str(p) for p in paths),
            cwd=root, capture_output=True, text=True, timeout=60, check=False,
        )
    except OSError:  # no git at all
        return set()
    if done.returncode not in (0, 1):  # 128: not a git checkout
        return set()
    return {Path(p) for p in done.stdout.split("\0") if p}


def generated_files(root: Path, *, skip_ignored: bool = False) -> list[Path]:
    """The generated files below `root`, relative to it. With `skip_ignored`,
    files that git ignores are left out: they are not part of the checkout."""
    files = sorted(
        p.relative_to(root)
        for p in (root / "python").rglob("*")
        if p.name.endswith(GENERATED_SUFFIXES)
    )
    if skip_ignored:
        ignored = ignored_by_git(root, files)
        files = [p for p in files if p not in ignored]
    return [*files, Path("llmmesh.binpb")]


def stale_files(gen: Path) -> list[Path]:
    """Generated files under `gen` that differ from what protos/ gives now,
    are missing, or should not be there."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want, have = generated_files(fresh), generated_files(gen, skip_ignored=True)
        stale = sorted(set(want) ^ set(have))
        stale += [
            p for p in want if p in have and not filecmp.cmp(fresh / p, gen / p, shallow=False)
        ]
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when gen/ is stale")
    args = parser.parse_args()
    gen = ROOT / "gen"
    if not args.check:
        for old in generated_files(gen, skip_ignored=True):
            (gen / old).unlink(missing_ok=True)
        generate(gen)
        count = len(generated_files(gen, skip_ignored=True))
        print(f"generated {count} files in {gen.relative_to(ROOT)}/")
        return 0
    stale = stale_files(gen)
    if stale:
        print("gen/ is stale; run `make gen` and commit:", file=sys.stderr)
        for path in stale:
            print(f"  gen/{path}", file=sys.stderr)
        return 1
    print("gen/ is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
