"""The launcher's plan and banner for `make up`'s switches: API keys, TLS,
and Prometheus missing. The processes themselves run in
tests/integration/test_launcher.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.launcher import configs
from services.launcher.plan import LaunchError, Plan, Ports, build_plan
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


