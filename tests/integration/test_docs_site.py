"""The documentation site builds with --strict, and --strict really fails on
what it must catch; the commands the README and the pages show run as
written (with the mesh's ports in place of the default ones) and answer as
shown."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.docs_markdown import DOCS, README, ROOT, TEXTS, fenced_blocks, shell_lines
from tests.harness.mesh import Mesh
from tests.harness.procs import free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def _docs_check_recipe() -> str:
    """The command `make docs-check` (part of `make test`) runs."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^docs-check:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "make docs-check builds the site"
    return recipe.group(1).replace("\t", "").strip()


def _build(project: Path) -> subprocess.CompletedProcess[str]:
    """`make docs-check`'s own command, in `project`."""
    pytest.importorskip("mkdocs", reason="mkdocs is in the dev extra (make test installs it)")
    recipe = _docs_check_recipe()
    assert "--strict" in recipe
    return subprocess.run(["bash", "-c", recipe], cwd=project, capture_output=True, text=True,
                          timeout=180, check=False, env=ENV)


def test_site_builds_strict(tmp_path: Path) -> None:
    project = _copy(tmp_path)
    result = _build(project)
    assert result.returncode == 0, result.stdout + result.stderr
    built = {p.parent.name for p in (project / ".run" / "site").glob("*/index.html")}
    assert built == {p.stem for p in DOCS.glob("*.md")} - {"index"}


def _copy(tmp_path: Path) -> Path:
    """The site's sources, copied: the checkout's .run/ is left alone."""
    project = tmp_path / "project"
    shutil.copytree(DOCS, project / "docs")
    shutil.copy(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    return project


def _replace(page: str, old: str, new: str) -> Callable[[Path], None]:
    def edit(project: Path) -> None:
        path = project / page
        text = path.read_text(encoding="utf-8")
        assert old in text
        path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return edit


def _add_page(project: Path) -> None:
    (project / "docs" / "orphan.md").write_text("# Not in the nav\n", encoding="utf-8")


BREAKAGES = {
    "link to a missing page": (_replace("docs/http-api.md", "(security.md)", "(securty.md)"),
                               "securty.md"),
    "link to a missing anchor": (_replace("docs/failures.md", "local-mesh.md#when-a-process-dies",
                                          "local-mesh.md#when-it-dies"), "when-it-dies"),
    "page missing from the nav": (_add_page, "orphan.md"),
    "nav entry without a page": (_replace("mkdocs.yml", "  - Development: development.md",
                                          "  - Development: developing.md"), "developing.md"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_strict_build_fails_on(breakage: str, tmp_path: Path) -> None:
    project = _copy(tmp_path)
    edit, named = BREAKAGES[breakage]
    edit(project)
    result = _build(project)
    said = result.stdout + result.stderr
    assert result.returncode != 0, said
    assert named in said and "Aborted" in said and "strict mode" in said, said


def _help_flags(module: str) -> set[str]:
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=60, check=True)
    return set(re.findall(r"--[\w-]+", result.stdout))


def test_flags_shown_are_in_each_programs_help() -> None:
    used: dict[str, set[str]] = {}
    for path in TEXTS:
        for line in shell_lines(path.read_text(encoding="utf-8")):
            for m in re.finditer(r"python3? -m ((?:services|tools)\.[\w.]+)([^&|;]*)", line):
                used.setdefault(m.group(1), set()).update(re.findall(r"--[\w-]+", m.group(2)))
    assert {"services.adapter", "services.router", "tools.tgi_double"} <= set(used)
    for module, flags in used.items():
        missing = flags - _help_flags(module)
        assert not missing, (module, missing)


def _on_mesh(command: str, mesh: Mesh) -> str:
    return (command.replace("localhost:8000", mesh.envoy)
            .replace("127.0.0.1:8000", mesh.envoy)
            .replace("localhost:50051", mesh.router)
            .replace("127.0.0.1:50051", mesh.router))


def _run(command: str, timeout: float = 60) -> str:
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=timeout, check=False)
    assert result.returncode == 0, (command, result.stdout, result.stderr)
    return result.stdout


def _replies(output: str) -> list[dict[str, object]]:
    """A JSON reply, or the JSON events of a Server-Sent Events stream."""
    if output.lstrip().startswith("data:"):
        events = [line.removeprefix("data: ") for line in output.splitlines()
                  if line.startswith("data:")]
        return [json.loads(e) for e in events if e != "[DONE]"]
    return [json.loads(output)]


def test_readme_requests_answer_as_shown(mesh: Mesh) -> None:
    """The README's one request per API, as written, against the mesh (over the
    TGI double, so the words differ): the same fields, the same model names."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## One request per API"):text.index("\n## Architecture")]
    shown_blocks = fenced_blocks(section)
    shell = [body for lang, body in shown_blocks if lang in ("bash", "")]
    shown = [json.loads(body) for lang, body in shown_blocks if lang == "json"]
    # curl, then its reply
    (curl,) = [b for b in shell if b.startswith("curl ")]
    reply = _replies(_run(_on_mesh(curl, mesh)))[0]
    assert reply.keys() == shown[0].keys() and reply["model"] == shown[0]["model"], reply
    # grpcurl: the command after "$ ", its reply after the command
    (grpc_block,) = [b for b in shell if b.startswith("$ grpcurl")]
    command, _, output = grpc_block.removeprefix("$ ").partition("\n{")
    reply = json.loads(_run(_on_mesh(command, mesh)))
    expected = json.loads("{" + output)
    assert reply.keys() == expected.keys() and reply["model"] == expected["model"], reply
    # the two Python examples, each printing what its comments show
    stubs, sdk = [body for lang, body in shown_blocks if lang == "python"]
    printed = _run(f"{sys.executable} - <<'EOF'\n{_on_mesh(stubs, mesh)}EOF\n")
    assert re.search(r" \d+ FINISH_REASON_(EOS_TOKEN|LENGTH|STOP_SEQUENCE)$", printed.strip())
    printed = _run(f"{sys.executable} - <<'EOF'\n{_on_mesh(sdk, mesh)}EOF\n").splitlines()
    assert printed[0] == "['qwen2', 'llama3']"
    assert printed[-1].startswith("CompletionUsage(completion_tokens=")


def _mesh_commands() -> list[tuple[str, str]]:
    """(page, command) for every curl and grpcurl line the docs address to
    the mesh's default ports; those needing a key, a CA or another host skipped."""
    found = []
    for path in TEXTS:
        for line in shell_lines(path.read_text(encoding="utf-8")):
            if not re.match(r"(curl|grpcurl|\.venv/bin/grpcurl) ", line):
                continue
            if not re.search(r"(localhost|127\.0\.0\.1):(8000|50051)\b", line):
                continue
            if re.search(r"\$|--cacert|-cacert|https://", line):
                continue
            found.append((str(path.relative_to(ROOT)), line))
    return found


def test_every_mesh_command_in_the_docs_runs(mesh: Mesh) -> None:
    commands = _mesh_commands()
    assert len(commands) >= 15
    for page, command in commands:
        output = _run(_on_mesh(command, mesh))
        if " list" in command and "{" not in output:
            assert "llmmesh.v1.GenerateService" in output, (page, command, output)
            continue
        replies = _replies(output)
        assert replies and all(isinstance(r, dict) and r for r in replies), (page, command)
        if '"top_p":1.0' in command:  # the HTTP API page's example of an error
            assert replies[0]["code"] == 3, output
            continue
        for reply in replies:
            assert "error" not in reply and "code" not in reply, (page, command, output)


def test_the_by_hand_mesh_of_the_grpc_page_runs() -> None:
    """docs/grpc.md's five processes by hand, on free ports instead of the
    default ones (the registry's adapter addresses follow the environment)."""
    text = (DOCS / "grpc.md").read_text(encoding="utf-8")
    (script,) = [b for lang, b in fenced_blocks(text) if lang == "bash" and "tools.tgi_double" in b]
    ports = {old: str(free_port()) for old in ("8091", "8092", "50061", "50062", "50051")}
    for old, new in ports.items():
        script = re.sub(rf"\b{old}\b", new, script)
    env = {**ENV, "QWEN2_ADAPTERS": f"127.0.0.1:{ports['50061']}",
           "LLAMA3_ADAPTERS": f"127.0.0.1:{ports['50062']}"}
    # Its own process group: whatever the script leaves behind is killed.
    proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        output, errors = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output + errors
    assert "llmmesh.v1.GenerateService" in output
    assert '"generated_text": "你好"' in output, output
    assert '"SERVING"' in output and '"models"' in output, output
