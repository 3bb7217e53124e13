"""The README and the documentation site (docs/, mkdocs.yml) say only what is
true of this checkout: links and anchors resolve, every `make` target, module,
path, RPC and request body they show exists or parses as the mesh reads it.
The site's own strict build (links between pages, the nav) is checked by
tests/integration/test_docs_site.py; the commands run against a mesh there too."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2
from llmmesh.v1 import generate_pb2
from markdown.extensions.toc import slugify

from services.openai.requests import parse_chat, parse_completion
from tests.docs_markdown import (
    DOCS,
    LINK,
    README,
    ROOT,
    TEXTS,
    code_shown,
    fenced_blocks,
    prose,
    shell_lines,
)

# Top-level folders of the checkout: a word starting with one of them is a path.
TOP = ("scripts/", "services/", "tools/", "models/", "deploy/k8s", "envoy/", "observability/",
       "tests/", "web/", "gen/", "protos/", "docs/")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _anchors(path: Path) -> set[str]:
    text = prose(path.read_text(encoding="utf-8"))
    return {slugify(m.group(1).strip(), "-") for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([a-z][\w-]*):", text, re.M))


def test_readme_is_read_in_five_minutes():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


def test_every_page_is_in_the_nav():
    """mkdocs --strict fails on this too; here it fails in seconds."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))

    def pages(nav: object) -> list[str]:
        if isinstance(nav, str):
            return [nav]
        if isinstance(nav, list):
            return [p for item in nav for p in pages(item)]
        if isinstance(nav, dict):
            return [p for value in nav.values() for p in pages(value)]
        return []

    listed = pages(config["nav"])
    assert sorted(listed) == sorted(p.name for p in DOCS.glob("*.md"))
    assert config["dev_addr"] == "127.0.0.1:8010"  # 8000 is Envoy's


def test_readme_links_resolve():
    """The README is not part of the site: its links are checked here."""
    text = README.read_text(encoding="utf-8")
    targets = LINK.findall(prose(text))
    assert targets, "the README links into the docs"
    for target in targets:
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path if path else README
        assert file.exists(), target
        if anchor:
            assert anchor in _anchors(file), target


def test_architecture_picture_is_the_same_in_readme_and_docs():
    readme = README.read_text(encoding="utf-8")
    section = readme[readme.index("\n## Architecture\n"):]
    page = (DOCS / "architecture.md").read_text(encoding="utf-8")
    assert fenced_blocks(section)[0][1] == fenced_blocks(page)[0][1]
    assert "router :50051" in fenced_blocks(page)[0][1]


def test_make_targets_shown_exist():
    targets = _makefile_targets()
    seen = set()
    for path in TEXTS:
        for code in code_shown(path.read_text(encoding="utf-8")):
            for target in re.findall(r"(?:^|[\s;&(])make ([a-z][\w-]*)", code):
                assert target in targets, (_rel(path), code)
                seen.add(target)
    assert {"up", "test", "docs", "bench", "loadtest", "gen"} <= seen


def test_python_modules_shown_exist():
    seen = set()
    for path in TEXTS:
        for code in code_shown(path.read_text(encoding="utf-8")):
            for module in re.findall(r"python3? -m ([\w.]+)", code):
                if module in ("pip", "pytest", "venv", "llama_cpp.server"):
                    continue
                assert importlib.util.find_spec(module) is not None, (_rel(path), code)
                seen.add(module)
    assert {"services.launcher", "tools.loadtest", "tools.tgi_double"} <= seen


def test_paths_shown_exist():
    checked = 0
    for path in TEXTS:
        for code in code_shown(path.read_text(encoding="utf-8")):
            for word in re.split(r"[\s'\"(),=:]+", code):
                word = word.rstrip(".;`")
                if not word.startswith(TOP) or re.search(r"[<>{}*$\[\]|]", word):
                    continue
                assert (ROOT / word).exists(), (_rel(path), word)
                checked += 1
    assert checked > 50


def _requests(flag_of: str) -> list[tuple[Path, str, str, dict[str, object]]]:
    """(page, command, where, body) of every `curl`/`grpcurl` line with a -d body."""
    found = []
    for path in TEXTS:
        for line in shell_lines(path.read_text(encoding="utf-8")):
            if not line.startswith(flag_of + " ") and f" {flag_of} " not in f" {line} ":
                continue
            words = shlex.split(line.split(" | ")[0])
            start = words.index(flag_of)
            words = words[start:]
            if "-d" not in words:
                continue
            body = words[words.index("-d") + 1]
            if "$" in body:
                continue  # a shell variable inside: built by the script around it
            where = next((w for w in words if "/v1/" in w or re.fullmatch(r"[\w.]+/\w+", w)), "")
            found.append((path, line, where, json.loads(body)))
    return found


def test_curl_bodies_are_what_the_mesh_reads():
    """Each body parses as the route's request: strictly (no unknown field)
    into the proto for the transcoded routes, with the OpenAI face's own
    parser for the OpenAI routes."""
    routes = set()
    for path, line, url, body in _requests("curl"):
        route = "/v1/" + url.split("/v1/", 1)[1]
        if route in ("/v1/generate", "/v1/generate_stream"):
            message = (generate_pb2.GenerateRequest() if route == "/v1/generate"
                       else generate_pb2.GenerateStreamRequest())
            json_format.ParseDict(body, message)
            assert message.model_id and (message.inputs or message.messages), line
        elif route == "/v1/chat/completions":
            assert parse_chat(body).generation.model_id, line
        elif route == "/v1/completions":
            assert parse_completion(body).generation.model_id, line
        else:
            pytest.fail(f"{_rel(path)}: no reader for {route}: {line}")
        routes.add(route)
    assert {"/v1/generate", "/v1/generate_stream", "/v1/chat/completions"} <= routes


def test_grpcurl_calls_name_real_methods_with_real_bodies():
    pool = DescriptorPool()
    for module in (generate_pb2, health_pb2):
        for dep in _file_and_deps(module.DESCRIPTOR):
            try:
                pool.FindFileByName(dep.name)
            except KeyError:
                pool.AddSerializedFile(dep.serialized_pb)
    methods = set()
    for path in TEXTS:
        for line in shell_lines(path.read_text(encoding="utf-8")):
            for method in re.findall(r"\b((?:llmmesh|grpc)\.[\w.]+/\w+)", line):
                service, name = method.split("/")
                pool.FindServiceByName(service).FindMethodByName(name)  # KeyError if not
                methods.add(method)
    assert "llmmesh.v1.GenerateService/Generate" in methods
    bodies = 0
    for path, line, method, body in _requests("grpcurl"):
        service, name = method.split("/")
        rpc = pool.FindServiceByName(service).FindMethodByName(name)
        json_format.ParseDict(body, GetMessageClass(rpc.input_type)())
        bodies += 1
        assert path.exists(), line
    assert bodies >= 3


def _file_and_deps(file):  # type: ignore[no-untyped-def]
    for dep in file.dependencies:
        yield from _file_and_deps(dep)
    yield file
