"""Regenerate gen/ from protos/: Python stubs and Envoy's descriptor set.

`python scripts/gen.py` writes the files; `python scripts/gen.py --check`
generates into a scratch folder and fails when the committed files differ.
"""

from __future__ import annotations

import argparse
import filecmp
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


def generated_files(root: Path) -> list[Path]:
    files = [p for p in (root / "python").rglob("*") if p.name.endswith(GENERATED_SUFFIXES)]
    return [*sorted(p.relative_to(root) for p in files), Path("llmmesh.binpb")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when gen/ is stale")
    args = parser.parse_args()
    gen = ROOT / "gen"
    if not args.check:
        for old in generated_files(gen):
            (gen / old).unlink(missing_ok=True)
        generate(gen)
        print(f"generated {len(generated_files(gen))} files in {gen.relative_to(ROOT)}/")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want, have = generated_files(fresh), generated_files(gen)
        stale = sorted(set(want) ^ set(have))
        stale += [
            p for p in want if p in have and not filecmp.cmp(fresh / p, gen / p, shallow=False)
        ]
        if stale:
            print("gen/ is stale; run `make gen` and commit:", file=sys.stderr)
            for path in stale:
                print(f"  gen/{path}", file=sys.stderr)
            return 1
    print("gen/ is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
