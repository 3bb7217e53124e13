"""Envoy's configs: rendered from one template, valid for the real Envoy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]
ENVOY = Path(sys.executable).parent / "envoy"
sys.path.insert(0, str(ROOT / "envoy"))
import render  # noqa: E402  (envoy/render.py)


def test_committed_configs_are_rendered():
    for name, values in render.PROFILES.items():
        path = ROOT / "envoy" / f"envoy.{name}.yaml"
        assert path.read_text() == render.render(**values), f"{path.name} is stale: make gen"


def test_profiles_differ_only_in_addresses():
    local = render.render(**render.PROFILES["local"]).splitlines()
    compose = render.render(**render.PROFILES["compose"]).splitlines()
    changed = [(a, b) for a, b in zip(local, compose, strict=True) if a != b]
    assert len(changed) == 5
    for a, _ in changed:
        assert any(k in a for k in ("address", "port_value", "type:", "proto_descriptor"))


@pytest.mark.parametrize("profile", ["local", "compose"])
def test_envoy_validates(profile, tmp_path):
    values = {**render.PROFILES[profile], "DESCRIPTOR": str(ROOT / "gen" / "llmmesh.binpb")}
    config = tmp_path / "envoy.yaml"
    config.write_text(render.render(**values))
    result = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(config)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Deprecated" not in result.stdout + result.stderr


def test_transcoder_settings():
    config = yaml.safe_load(render.render())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = {f["name"]: f for f in hcm["typed_config"]["http_filters"]}
    transcoder = filters["envoy.filters.http.grpc_json_transcoder"]["typed_config"]
    assert transcoder["services"] == ["llmmesh.v1.GenerateService"]
    assert transcoder["convert_grpc_status"] is True
    assert transcoder["print_options"]["preserve_proto_field_names"] is True
    assert transcoder["print_options"]["stream_sse_style_delimited"] is True
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    stream = routes[0]["route"]
    assert stream["timeout"] == "0s" and stream["idle_timeout"] == "60s"
    proxied = [r for r in routes if "route" in r]  # not the playground's direct response
    for route in proxied:
        # Only failures before the request reached the router are retried.
        retry_on = set(route["route"]["retry_policy"]["retry_on"].split(","))
        assert retry_on <= {"connect-failure", "refused-stream", "reset-before-request"}
    # The body limit is on for HTTP/JSON routes only (gRPC has its own).
    assert filters["envoy.filters.http.buffer"]["disabled"] is True
    limited = [r["match"]["prefix"] for r in proxied if "typed_per_filter_config" in r]
    assert limited == ["/v1/generate_stream", "/v1/"]
