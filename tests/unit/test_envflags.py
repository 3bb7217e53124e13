"""Every flag has an environment variable: the helper, and each program's
real parser (router, adapter, CPU backend, launcher)."""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common import envflags
from tests.procs import ROOT


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo")
    p.add_argument("--health-interval", type=float, default=1.0, help="seconds")
    p.add_argument("--name", default=None)
    p.add_argument("--dir", type=Path, default=Path("x"))
    p.add_argument("--tls", action="store_true")
    p.add_argument("--level", default="info", choices=["info", "debug"])
    p.add_argument("--tgi-url", default=None)
    return p


def test_the_environment_gives_the_default_and_the_command_line_wins() -> None:
    p = parser()
    env = {"LLMMESH_HEALTH_INTERVAL": "7", "LLMMESH_NAME": "n", "LLMMESH_DIR": "/d",
           "LLMMESH_TLS": "yes", "TGI_URL": "http://t"}
    envflags.apply(p, env, names={"tgi_url": "TGI_URL"})
    args = p.parse_args([])
    assert args.health_interval == 7.0 and isinstance(args.health_interval, float)
    assert args.name == "n" and args.dir == Path("/d") and args.tls is True
    assert args.tgi_url == "http://t"
    assert p.parse_args(["--health-interval", "3"]).health_interval == 3.0


def test_unset_or_empty_variables_leave_the_default() -> None:
    p = parser()
    envflags.apply(p, {"LLMMESH_NAME": "", "LLMMESH_TLS": ""})
    args = p.parse_args([])
    assert args.name is None and args.tls is False and args.health_interval == 1.0


@pytest.mark.parametrize("var, value, says", [
    ("LLMMESH_HEALTH_INTERVAL", "soon", "LLMMESH_HEALTH_INTERVAL='soon'"),
    ("LLMMESH_TLS", "maybe", "LLMMESH_TLS='maybe': expected 1/0"),
    ("LLMMESH_LEVEL", "loud", "LLMMESH_LEVEL='loud': must be one of info, debug"),
])
def test_a_bad_value_is_refused_naming_the_variable(
    var: str, value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        envflags.apply(parser(), {var: value})
    assert caught.value.code == 2
    assert says in capsys.readouterr().err


def test_help_names_the_variable_and_the_default_in_force() -> None:
    p = parser()
    envflags.apply(p, {"LLMMESH_HEALTH_INTERVAL": "7"}, names={"tgi_url": "TGI_URL"})
    text = " ".join(p.format_help().split())
    assert "seconds [env LLMMESH_HEALTH_INTERVAL, default 7.0]" in text
    assert "[env TGI_URL]" in text and "[env LLMMESH_TLS]" in text


PROGRAMS = ["services.router", "services.adapter", "services.cpu_backend", "services.launcher"]


@pytest.mark.parametrize("module", PROGRAMS)
def test_every_flag_of_every_program_shows_its_variable(module: str) -> None:
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"}).stdout
    # One block per option: its line and the help lines indented below it.
    blocks = re.findall(r"^  (-.*(?:\n {4,}\S.*)*)", out, flags=re.MULTILINE)
    options = [" ".join(b.split()) for b in blocks if not b.startswith("-h, --help")]
    assert len(options) >= 9, out
    for option in options:
        variables = r"LLMMESH_[A-Z_]+|TGI_URL|ENGINE_URL|ENGINE_API_KEY_FILE|BACKENDS"
        assert re.search(rf"\[env ({variables})\b", option), option


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_health_interval_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    from services.adapter.__main__ import parse_args as adapter_args
    from services.cpu_backend.__main__ import parse_args as backend_args
    from services.launcher.__main__ import parse_args as launcher_args
    from services.router.__main__ import parse_args as router_args

    monkeypatch.setenv("LLMMESH_HEALTH_INTERVAL", "7")
    monkeypatch.setenv("LLMMESH_GRACE", "3")
    monkeypatch.setenv("LLMMESH_THREADS", "1")
    monkeypatch.setenv("LLMMESH_RESTART_LIMIT", "9")
    router = router_args([])
    assert router.health_interval == 7.0 and router.server.grace_seconds == 3.0
    adapter = adapter_args(["--model", "qwen2", "--tgi-url", "http://127.0.0.1:1"])
    assert adapter.health_interval == 7.0
    assert backend_args([]).threads == 1
    assert launcher_args([]).restart_limit == 9
