"""Every flag has an environment variable: the helper, and each program's
real parser (router, adapter, CPU backend, launcher)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common import envflags


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
