"""The playground page as envoy/render.py builds it into Envoy's configs."""

from __future__ import annotations

import base64
import hashlib
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]
WEB = ROOT / "web" / "playground"
sys.path.insert(0, str(ROOT / "envoy"))
import render  # noqa: E402  (envoy/render.py)


def sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def routes_and_mappers(text: str) -> tuple[list[dict], list[dict], dict]:
    config = yaml.safe_load(text)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    route_config = hcm["typed_config"]["route_config"]
    mappers = hcm["typed_config"]["local_reply_config"]["mappers"]
    return route_config["virtual_hosts"][0]["routes"], mappers, route_config


def test_page_inlines_its_style_and_script_once():
    page, _ = render.playground_page()
    css = (WEB / "playground.css").read_text()
    js = (WEB / "playground.js").read_text()
    assert page.count("<style>") == 1 and css in page
    assert page.count("<script>") == 1 and js in page
    assert 'href="playground.css"' not in page and 'src="playground.js"' not in page
    # No request leaves for anywhere but the mesh's own API.
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)
    assert re.findall(r"fetch\(\"([^\"]+)\"", js) == ["/v1/mesh/models", "/v1/generate_stream"]


def test_policy_allows_exactly_the_inline_blocks():
    page, policy = render.playground_page()
    (style,) = re.findall(r"<style>(.*?)</style>", page, re.S)
    (script,) = re.findall(r"<script>(.*?)</script>", page, re.S)
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == f"'sha256-{sha256(script)}'"
    assert directives["style-src"] == f"'sha256-{sha256(style)}'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in policy


def test_every_element_the_script_names_is_on_the_page():
    html = (WEB / "index.html").read_text()
    js = (WEB / "playground.js").read_text()
    ids = set(re.findall(r'id="([^"]+)"', html))
    named = set(re.findall(r'\$\("([^"]+)"\)', js))
    named |= {name for name in re.findall(r'for \(const name of \[([^\]]+)\]', js)
              for name in re.findall(r'"([^"]+)"', name)}
    assert named and named <= ids, named - ids
    for control in re.findall(r'<(?:input|select|textarea)[^>]*\bid="([^"]+)"', html):
        assert f'<label for="{control}">' in html, f"#{control} has no label"


def test_every_config_serves_the_page_at_the_root():
    page, policy = render.playground_page()
    committed = [ROOT / "envoy" / f"envoy.{name}.yaml" for name in render.PROFILES]
    committed.append(ROOT / "deploy" / "k8s" / "base" / "envoy" / "envoy.yaml")
    for path in committed:
        routes, mappers, route_config = routes_and_mappers(path.read_text())
        (served,) = [r for r in routes if "direct_response" in r]
        assert served["match"]["path"] == "/", path
        assert served["direct_response"]["body"]["inline_string"] == page, path
        assert route_config["max_direct_response_body_size_bytes"] >= len(page.encode())
        headers = {h["header"]["key"]: h["header"]["value"]
                   for h in served["response_headers_to_add"]}
        assert headers["content-security-policy"] == policy
        transcoder = served["typed_per_filter_config"]["envoy.filters.http.grpc_json_transcoder"]
        assert transcoder["disabled"] is True
        # It comes before the catch-all that proxies everything else.
        assert routes.index(served) < next(
            i for i, r in enumerate(routes) if r["match"].get("prefix") == "/")
        # The page keeps its body and type through local_reply_config.
        assert mappers[0]["body_format_override"]["content_type"].startswith("text/html")
