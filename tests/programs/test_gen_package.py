"""The generated stubs are a package of their own (`pip install ./gen/python`)."""

import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_stubs_build_into_a_wheel(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT / "gen" / "python", source,
                    ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-q", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("llmmesh_protos-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("generate_pb2.py", "generate_pb2.pyi", "generate_pb2_grpc.py"):
        assert f"llmmesh/v1/{module}" in names
    assert "llmmesh/py.typed" in names
    metadata = next(n for n in names if n.endswith("METADATA"))
    requires = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Requires-Dist: grpcio" in requires and "Requires-Dist: protobuf" in requires
    # Every module the Python client examples (README, docs/grpc.md) import comes with the stubs,
    # grpc_status (for rpc_status.from_call) included.
    required = {
        re.split(r"[ ;<>=!~(\[]", line.removeprefix("Requires-Dist: "))[0].lower()
        for line in requires.splitlines()
        if line.startswith("Requires-Dist: ")
    }
    providers = importlib.metadata.packages_distributions()
    for module in ("grpc", "grpc_status", "google"):
        assert {d.lower() for d in providers[module]} & required, (module, required)
    assert {"grpcio", "grpcio-status", "protobuf", "googleapis-common-protos"} <= required


def _load_gen_script():
    spec = importlib.util.spec_from_file_location("gen_script", ROOT / "scripts" / "gen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd, check=True, capture_output=True, timeout=60,
    )


def test_pip_install_of_the_stubs_leaves_nothing_stale(tmp_path):
    """`pip install ./gen/python` leaves build/ and *.egg-info behind in the
    checkout; git ignores them, so the stale check must too."""
    gen_script = _load_gen_script()
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "gen", checkout / "gen",
                    ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    shutil.copy(ROOT / ".gitignore", checkout / ".gitignore")
    _git(checkout, "init", "-q")
    _git(checkout, "add", "-A")
    _git(checkout, "commit", "-q", "-m", "stubs")
    assert gen_script.stale_files(checkout / "gen") == []

    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-q", "--target", str(tmp_path / "site"), "./gen/python"],
        cwd=checkout, capture_output=True, text=True, timeout=300, check=False,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    leftovers = list((checkout / "gen" / "python" / "build").rglob("*_pb2.py"))
    assert leftovers, "pip left no build output here: this test no longer tests anything"
    assert gen_script.stale_files(checkout / "gen") == []

    # A generated file that git does not ignore still counts.
    stray = checkout / "gen" / "python" / "llmmesh" / "v1" / "old_pb2.py"
    stray.write_text("# left over\n")
    assert gen_script.stale_files(checkout / "gen") == [Path("python/llmmesh/v1/old_pb2.py")]
