"""`make test` fails on a skipped test (tests/strict_skips.py)."""

import subprocess
import sys

from tests.harness.procs import ROOT


def run(tmp_path, *plugin: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_some.py").write_text(
        "import pytest\n"
        "def test_runs(): pass\n"
        "def test_skips(): pytest.skip('no such tool here')\n"
        "@pytest.mark.xfail(reason='a known bug')\n"
        "def test_known_bug(): assert False\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin,
         "--rootdir", str(tmp_path), str(tmp_path / "test_some.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )


def test_a_skip_fails_the_run_with_its_reason(tmp_path):
    done = run(tmp_path, "-p", "tests.strict_skips")
    assert done.returncode == 1, done.stdout
    assert "1 failed, 1 passed, 1 xfailed" in done.stdout
    assert "test_skips was skipped" in done.stdout and "no such tool here" in done.stdout


def test_without_the_plugin_a_skip_is_a_skip(tmp_path):
    done = run(tmp_path)
    assert done.returncode == 0, done.stdout
    assert "1 passed, 1 skipped, 1 xfailed" in done.stdout
