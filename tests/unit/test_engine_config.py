"""How a model's engine is configured: the registry's engine entry, the
adapter's flags and environment, and `make up BACKENDS=...`."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.adapter import __main__ as adapter_main
from services.adapter.engine_load import LoadSampler
from services.adapter.engines.openai_compatible import OpenAICompatibleEngine
from services.adapter.engines.tgi import TGIEngine
from services.common.registry import load_registry
from services.launcher.plan import LaunchError, Ports, build_plan, engine_of, parse_backends

ROOT = Path(__file__).parents[2]
REGISTRY = ROOT / "models" / "registry.yaml"


def parse(monkeypatch: pytest.MonkeyPatch, *argv: str, **env: str) -> adapter_main.AdapterSettings:
    for name in ("LLMMESH_ENGINE", "ENGINE_URL", "TGI_URL", "LLMMESH_SERVED_MODEL",
                 "LLMMESH_CHAT_API", "QWEN2_ENGINE", "QWEN2_ENGINE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return adapter_main.parse_args(["--model", "qwen2", *argv])


def test_tgi_is_the_default_and_tgi_url_still_works(monkeypatch):
    settings = parse(monkeypatch, TGI_URL="http://tgi:80")
    assert (settings.engine.kind, settings.engine.url) == ("tgi", "http://tgi:80")
    backend, metrics = adapter_main.make_engine(settings)
    assert isinstance(backend, TGIEngine) and metrics == "http://tgi:80/metrics"


def test_flags_override_the_environment_and_the_registry(monkeypatch):
    settings = parse(
        monkeypatch, "--engine", "vllm", "--served-model", "q",
        ENGINE_URL="http://vllm:8000/v1", QWEN2_ENGINE="sglang",
        LLMMESH_CHAT_API="engine",
    )
    assert settings.engine.kind == "vllm" and settings.engine.served_model == "q"
    assert settings.engine.chat_api == "engine"
    backend, metrics = adapter_main.make_engine(settings)
    assert isinstance(backend, OpenAICompatibleEngine) and backend.applies_template
    assert (backend.base_url, metrics) == ("http://vllm:8000/v1", "http://vllm:8000/metrics")


def test_the_registry_names_the_engine(monkeypatch):
    settings = parse(monkeypatch, QWEN2_ENGINE="llamacpp", QWEN2_ENGINE_URL="http://h:9/v1")
    assert (settings.engine.kind, settings.engine.url) == ("llamacpp", "http://h:9/v1")
    _, metrics = adapter_main.make_engine(settings)
    assert metrics == "http://h:9/metrics"  # llama-server's, with --metrics
    settings = parse(monkeypatch, QWEN2_ENGINE="ollama", QWEN2_ENGINE_URL="http://h:9/v1")
    assert adapter_main.make_engine(settings)[1] is None  # Ollama has no /metrics


def test_bad_engine_settings_stop_the_adapter(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        parse(monkeypatch)  # no URL anywhere
    assert "--engine-url" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(monkeypatch, "--engine", "tgi", "--chat-api", "engine", ENGINE_URL="http://x")
    with pytest.raises(SystemExit):
        parse(monkeypatch, "--engine", "triton", ENGINE_URL="http://x")
    with pytest.raises(SystemExit):
        parse(monkeypatch, ENGINE_URL="http://x", LLMMESH_ENGINE="triton")
    assert "triton" in capsys.readouterr().err


def test_registry_refuses_unknown_engines(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("models:\n  - {id: a, name: A, engine: {kind: triton}}\n")
    with pytest.raises(SystemExit, match="triton"):
        load_registry(bad, env={})
    bad.write_text("models:\n  - {id: a, name: A, engine: {kind: tgi, chat_api: engine}}\n")
    with pytest.raises(SystemExit, match="rendered prompts"):
        load_registry(bad, env={})
    bad.write_text("models:\n  - {id: a, name: A, engine: {kind: vllm, port: 1}}\n")
    with pytest.raises(SystemExit, match="port"):
        load_registry(bad, env={})
    shipped = load_registry(REGISTRY, env={})
    assert {m.engine.kind for m in shipped.models} == {"tgi"}


def test_backends_take_an_engine_prefix():
    backends = parse_backends("qwen2=openai+http://h:1/v1, llama3=http://h:2/")
    assert backends == {"qwen2": "openai+http://h:1/v1", "llama3": "http://h:2"}
    assert engine_of(backends["qwen2"]) == ("openai", "http://h:1/v1")
    assert engine_of(backends["llama3"]) == ("tgi", "http://h:2")
    for bad in ("qwen2=triton+http://h:1", "qwen2=h:1", "qwen2"):
        with pytest.raises(LaunchError):
            parse_backends(bad)


def test_the_launcher_passes_the_engine_to_the_adapter(tmp_path):
    plan = build_plan(
        root=ROOT, run_dir=tmp_path, host="127.0.0.1", ports=Ports(),
        backends=parse_backends("qwen2=vllm+http://gpu:8000/v1 llama3=http://gpu:8081"),
        model_path=None, threads=1, max_concurrent_requests=None, prometheus=False,
    )
    argv = {p.name: list(p.argv) for p in plan.procs}
    qwen2, llama3 = argv["adapter-qwen2"], argv["adapter-llama3"]
    assert qwen2[qwen2.index("--engine") + 1] == "vllm"
    assert qwen2[qwen2.index("--engine-url") + 1] == "http://gpu:8000/v1"
    assert llama3[llama3.index("--engine") + 1] == "tgi"
    assert llama3[llama3.index("--engine-url") + 1] == "http://gpu:8081"
    assert not [p for p in plan.procs if p.name.startswith("backend-")]


async def test_a_sampler_without_an_engine_reports_nothing():
    sampler = LoadSampler("http://127.0.0.1:9/metrics", 0.1)
    try:
        assert await sampler.sample() is None
        assert sampler.current is None
    finally:
        await sampler.close()
