"""The generated stubs are a package of their own (`pip install ./gen/python`)."""

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
