"""The vLLM profile of docker-compose.yml: its references, and the adapter
driving vLLM's OpenAI-compatible server with the flags vLLM accepts."""

from __future__ import annotations

from tests.harness.deploy import (
    ROOT,
    adapter_settings,
    assert_reaches,
    bind_mounts,
    check_vllm_args,
    download_folders,
    enabled,
    env_of,
    names_in,
    router_settings,
    services,
)


def test_vllm_profile_config_and_references() -> None:
    profile = "vllm"
    names = names_in(profile)
    assert "tgi-qwen2" not in names and {"vllm-qwen2", "tgi-llama3"} <= set(names)
    for name, svc in enabled(profile).items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert cond["condition"] == "service_healthy", f"{name} -> {dep}"
            assert dep in enabled(profile) or cond.get("required") is False, (name, dep)
    # TGI sizes its KV cache from what vLLM left: it starts after vLLM.
    assert "vllm-qwen2" in services()["tgi-llama3"]["depends_on"]


def test_vllm_adapter_drives_the_vllm_server() -> None:
    profile = "vllm"
    vllm = services()["vllm-qwen2"]
    f = check_vllm_args("vllm-qwen2", vllm["command"])
    model = vllm["command"][0]
    assert model.removeprefix("/models/") in download_folders()
    assert bind_mounts(vllm)["/models"] == ROOT / "models"
    adapters = [s for n, s in enabled(profile).items() if env_of(s).get("LLMMESH_MODEL")]
    assert len(adapters) == 2
    for svc in adapters:
        settings = adapter_settings(env_of(svc))
        backend = assert_reaches(profile, settings.engine.url, what="adapter engine URL")
        if settings.model.id == "qwen2":
            assert backend == "vllm-qwen2"
            assert settings.engine.kind == "vllm" and settings.engine.url.endswith("/v1")
            assert settings.engine.served_model == f["served-model-name"]
            assert settings.max_concurrency == int(f["max-num-seqs"])
            assert settings.chat_template == ROOT / "models" / "templates" / "qwen2.jinja"
        else:
            assert backend == "tgi-llama3" and settings.engine.kind == "tgi"
    router = router_settings(env_of(enabled(profile)["router"]))
    for spec in router.registry.models:
        target = assert_reaches(profile, spec.adapters[0], what=f"router {spec.id}")
        assert env_of(enabled(profile)[target])["LLMMESH_MODEL"] == spec.id
