"""The launcher's plan and banner for `make up`'s switches: API keys, TLS,
and Prometheus missing. The processes themselves run in
tests/integration/test_launcher.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.launcher import configs
from services.launcher.plan import LaunchError, Plan, Ports, build_plan, parse_backends
from tests.harness.procs import ROOT

BACKENDS = {"qwen2": "http://127.0.0.1:1", "llama3": "http://127.0.0.1:2"}


def plan(tmp: Path, **kwargs: object) -> Plan:
    values: dict[str, object] = dict(
        root=ROOT, run_dir=tmp / "run", host="127.0.0.1", ports=Ports(), backends=BACKENDS,
        model_path=None, threads=1, max_concurrent_requests=None, prometheus=False,
    )
    values.update(kwargs)
    return build_plan(**values)  # type: ignore[arg-type]


def test_prometheus_missing_is_said_with_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no prometheus here
    missing = plan(tmp_path, prometheus=True)
    assert not missing.prometheus
    assert "prometheus" not in [p.name for p in missing.procs]
    (note,) = missing.notes
    assert "Prometheus is not installed" in note and "sudo apt-get install prometheus" in note
    assert "not running (see the note above)" in configs.banner(missing)
    # Asked not to start it: no note.
    assert plan(tmp_path, prometheus=False).notes == ()


def test_api_keys_reach_the_router_and_the_banner(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# comment\n\nsecret-one\n")
    p = plan(tmp_path, api_keys_file=keys)
    router = next(x for x in p.procs if x.name == "router")
    assert ("--api-keys-file", str(keys)) == router.argv[-2:]
    envoy = next(x for x in p.procs if x.name == "envoy")
    assert envoy.ready.authorization == "Bearer secret-one"
    banner = configs.banner(p)
    assert f"KEY=$(awk 'NF && !/^#/ {{print $1; exit}}' {keys})" in banner
    assert '-H "Authorization: Bearer $KEY"' in banner
    assert "secret-one" not in banner  # the banner names the file, never the key


def test_an_api_keys_file_without_keys_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "keys.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(LaunchError, match="holds no key"):
        plan(tmp_path, api_keys_file=empty)


def test_tls_plan_serves_https_and_mutual_tls_inside(tmp_path: Path) -> None:
    p = plan(tmp_path, tls_dir=tmp_path / "tls")
    assert p.tls is not None
    tls = p.tls
    by_name = {x.name: x for x in p.procs}
    for name, cert in (("adapter-qwen2", "adapter"), ("adapter-llama3", "adapter"),
                       ("router", "router")):
        argv = " ".join(by_name[name].argv)
        assert f"--tls-cert {tls.cert(cert)} --tls-key {tls.key(cert)} --tls-ca {tls.ca}" in argv
        ready = by_name[name].ready
        assert ready.tls is not None and ready.tls.cert == tls.cert("client")
    envoy = by_name["envoy"].ready
    assert envoy.target.startswith("https://") and envoy.tls is not None
    assert envoy.tls.cert is None  # the edge asks no client certificate
    config = yaml.safe_load(configs.envoy_config(p))
    listener = config["static_resources"]["listeners"][0]
    assert "DownstreamTlsContext" in str(listener["filter_chains"][0]["transport_socket"])
    banner = configs.banner(p)
    assert f"curl --cacert {tls.ca} https://127.0.0.1:8000/v1/generate" in banner
    assert f"grpcurl -cacert {tls.ca} 127.0.0.1:8000 list" in banner


def test_the_banner_calls_grpcurl_from_the_venv(tmp_path: Path) -> None:
    banner = configs.banner(plan(tmp_path))
    assert "grpcurl -plaintext 127.0.0.1:8000 list" in banner
    line = next(x for x in banner.splitlines() if "grpcurl -plaintext" in x)
    assert line.split()[0].endswith("bin/grpcurl"), line  # a path, not the bare name


def test_replicas_give_each_cpu_model_backends_and_adapters_on_the_port_scheme(
    tmp_path: Path,
) -> None:
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"gguf")
    p = plan(tmp_path, backends={}, model_path=gguf, replicas=2)
    by_name = {x.name: x for x in p.procs}

    def flag(name: str, option: str) -> str:
        argv = list(by_name[name].argv)
        return argv[argv.index(option) + 1]

    # Model-major: qwen2's backends 8081-8082, llama3's 8083-8084; adapters and
    # their metrics ports in the same order.
    assert [flag(f"backend-{m}-{r}", "--port") for m in ("qwen2", "llama3") for r in (1, 2)] \
        == ["8081", "8082", "8083", "8084"]
    assert [flag(f"adapter-{m}-{r}", "--port") for m in ("qwen2", "llama3") for r in (1, 2)] \
        == ["50061", "50062", "50063", "50064"]
    assert [flag(f"adapter-{m}-{r}", "--metrics-port") for m in ("qwen2", "llama3")
            for r in (1, 2)] == ["9465", "9466", "9467", "9468"]
    assert flag("adapter-llama3-2", "--engine-url") == "http://127.0.0.1:8084"
    assert by_name["adapter-qwen2-2"].model == "qwen2"
    router = by_name["router"]
    assert router.env["QWEN2_ADAPTERS"] == "127.0.0.1:50061,127.0.0.1:50062"
    assert router.env["LLAMA3_ADAPTERS"] == "127.0.0.1:50063,127.0.0.1:50064"
    scrape = configs.prometheus_config(p)["scrape_configs"]
    jobs = {j["job_name"]: j["static_configs"] for j in scrape}
    assert jobs["adapter"] == [{"targets": [f"127.0.0.1:{9465 + i}" for i in range(4)]}]
    assert jobs["backend"] == [
        {"targets": ["127.0.0.1:8081", "127.0.0.1:8082"], "labels": {"model": "qwen2"}},
        {"targets": ["127.0.0.1:8083", "127.0.0.1:8084"], "labels": {"model": "llama3"}},
    ]
    banner = configs.banner(p)
    assert "llama3   adapter 127.0.0.1:50064 -> http://127.0.0.1:8084 (CPU backend" in banner
    assert ("engines' /metrics   " + ",".join(f"http://127.0.0.1:{8081 + i}/metrics"
                                             for i in range(4))) in banner
    # One replica keeps the names and ports a single mesh always had.
    assert "engines' /metrics" not in configs.banner(plan(tmp_path, backends={},
                                                           model_path=gguf))
    one = {x.name: x for x in plan(tmp_path, backends={}, model_path=gguf).procs}
    assert "--port" in one["backend-llama3"].argv and "8082" in one["backend-llama3"].argv
    assert one["router"].env["LLAMA3_ADAPTERS"] == "127.0.0.1:50062"
    with pytest.raises(LaunchError, match="REPLICAS"):
        plan(tmp_path, backends={}, model_path=gguf, replicas=0)


def test_context_bounds_reach_the_cpu_backends_only_when_set(tmp_path: Path) -> None:
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"gguf")
    bounded = {x.name: x for x in plan(tmp_path, backends={}, model_path=gguf,
                                       max_input_tokens=3072, max_total_tokens=4096).procs}
    argv = list(bounded["backend-qwen2"].argv)
    assert argv[argv.index("--max-input-tokens") + 1] == "3072"
    assert argv[argv.index("--max-total-tokens") + 1] == "4096"
    default = {x.name: x for x in plan(tmp_path, backends={}, model_path=gguf).procs}
    assert "--max-input-tokens" not in default["backend-qwen2"].argv
    assert "--max-total-tokens" not in default["backend-qwen2"].argv


def test_several_backends_urls_of_a_model_get_one_adapter_each(tmp_path: Path) -> None:
    backends = parse_backends("qwen2=http://a:1,vllm+http://b:2/v1 llama3=http://c:3")
    assert backends == {"qwen2": "http://a:1,vllm+http://b:2/v1", "llama3": "http://c:3"}
    # Items may be comma-separated too, as before.
    assert parse_backends("qwen2=http://a:1,llama3=http://c:3,http://d:4") == {
        "qwen2": "http://a:1", "llama3": "http://c:3,http://d:4"}
    with pytest.raises(LaunchError, match="several URLs"):
        parse_backends("http://a:1")  # a URL before any model
    p = plan(tmp_path, backends=backends, replicas=3)  # REPLICAS: CPU models only
    adapters = {x.name: list(x.argv) for x in p.procs if x.name.startswith("adapter-")}
    assert sorted(adapters) == ["adapter-llama3", "adapter-qwen2-1", "adapter-qwen2-2"]
    second = adapters["adapter-qwen2-2"]
    assert second[second.index("--engine") + 1] == "vllm"
    assert second[second.index("--engine-url") + 1] == "http://b:2/v1"
    assert second[second.index("--port") + 1] == "50062"
    llama3 = adapters["adapter-llama3"]
    assert llama3[llama3.index("--port") + 1] == "50063"
    router = next(x for x in p.procs if x.name == "router")
    assert router.env["QWEN2_ADAPTERS"] == "127.0.0.1:50061,127.0.0.1:50062"
    assert not [x for x in p.procs if x.name.startswith("backend-")]




def test_tenants_reach_the_router_and_a_redis_is_started(tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("tenants:\n  - name: a\n    key_sha256: ['" + "0" * 64 + "']\n"
                       "  - name: b\n    keys: [sk-b]\n")
    p = plan(tmp_path, tenants_file=tenants, quota_store="redis", ports=Ports(redis=6390))
    redis = next(x for x in p.procs if x.name == "redis")
    assert redis.stage == 0 and redis.ports == (6390,) and redis.ready.kind == "tcp"
    router = next(x for x in p.procs if x.name == "router")
    argv = " ".join(router.argv)
    assert f"--tenants-file {tenants}" in argv
    assert "--quota-store redis://127.0.0.1:6390" in argv
    envoy = next(x for x in p.procs if x.name == "envoy")
    assert envoy.ready.authorization == "Bearer sk-b"
    # The router's memory by default; an external Redis by URL.
    assert "redis" not in [x.name for x in plan(tmp_path, tenants_file=tenants).procs]
    external = plan(tmp_path, tenants_file=tenants, quota_store="redis://10.0.0.5:6379")
    assert "--quota-store redis://10.0.0.5:6379" in " ".join(
        next(x for x in external.procs if x.name == "router").argv)
    with pytest.raises(LaunchError, match="QUOTA_STORE"):
        plan(tmp_path, tenants_file=tenants, quota_store="memcached://x")
    with pytest.raises(LaunchError, match="needs TENANTS_FILE"):
        plan(tmp_path, quota_store="redis")
