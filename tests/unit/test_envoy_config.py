"""Envoy's configs: rendered from one template, valid for the real Envoy."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import grpc
import yaml

from services.common.errors import DOMAIN, EDGE_DEFAULT, EDGE_ERRORS, TABLE, Reason

ROOT = Path(__file__).parents[2]
ENVOY = Path(sys.executable).parent / "envoy"
sys.path.insert(0, str(ROOT / "envoy"))
import render  # noqa: E402  (envoy/render.py)


def test_committed_configs_are_rendered():
    for name, values in render.PROFILES.items():
        path = ROOT / "envoy" / f"envoy.{name}.yaml"
        otel = render.OTEL_PROFILES.get(name)
        assert path.read_text() == render.render(otel=otel, **values), (
            f"{path.name} is stale: make gen")


def test_profiles_differ_only_in_addresses():
    local = render.render(**render.PROFILES["local"]).splitlines()
    compose = render.render(**render.PROFILES["compose"]).splitlines()
    changed = [(a, b) for a, b in zip(local, compose, strict=True) if a != b]
    # The descriptor twice (the stream route has its own transcoder); the
    # address and discovery type of each of the two clusters.
    assert len(changed) == 8
    for a, _ in changed:
        assert any(k in a for k in ("address", "port_value", "type:", "proto_descriptor"))


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
    stream = next(r["route"] for r in routes if r["match"].get("prefix") == "/v1/generate_stream")
    assert stream["timeout"] == "0s" and stream["idle_timeout"] == "60s"
    proxied = [r for r in routes if "route" in r]  # not the playground's direct response
    for route in proxied:
        # Only failures before the request reached the router are retried.
        retry_on = set(route["route"]["retry_policy"]["retry_on"].split(","))
        assert retry_on <= {"connect-failure", "refused-stream", "reset-before-request"}
    # The body limit is on for HTTP/JSON routes only (gRPC has its own).
    assert filters["envoy.filters.http.buffer"]["disabled"] is True
    limited = [r["match"].get("prefix") or r["match"]["path"] for r in proxied
               if "typed_per_filter_config" in r and r["route"]["cluster"] == "router"]
    assert limited == ["/v1/generate_stream", "/v1/generate", "/v1/mesh/"]


def _hcm() -> dict:
    config = yaml.safe_load(render.render())
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]


def test_stream_route_prints_no_zero_fields_and_unary_routes_do():
    hcm = _hcm()
    filters = {f["name"]: f for f in hcm["http_filters"]}
    unary = filters["envoy.filters.http.grpc_json_transcoder"]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    (stream_route,) = [r for r in routes if r["match"].get("prefix") == "/v1/generate_stream"]
    stream = stream_route["typed_per_filter_config"]["envoy.filters.http.grpc_json_transcoder"]
    assert unary["print_options"]["always_print_primitive_fields"] is True
    assert stream["print_options"]["always_print_primitive_fields"] is False
    # Otherwise the same transcoder: nothing else may drift apart.
    same = {**stream, "print_options": {**stream["print_options"],
                                        "always_print_primitive_fields": True}}
    assert same == unary
    for route in routes:
        if route is not stream_route:  # others use the filter's settings, or none
            override = route.get("typed_per_filter_config", {}).get(
                "envoy.filters.http.grpc_json_transcoder", {})
            assert "print_options" not in override, route["match"]


def _expected_body(error) -> dict:
    info = {"@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": error.reason.value, "domain": DOMAIN}
    if error.metadata:
        info["metadata"] = dict(error.metadata)
    code = grpc.StatusCode[TABLE[error.reason].code].value[0]
    return {"code": code, "message": error.message, "details": [info]}


def test_envoys_own_errors_come_from_the_error_table():
    replies = _hcm()["local_reply_config"]
    bodies = {
        m["filter"]["status_code_filter"]["comparison"]["value"]["default_value"]:
            m["body_format_override"]
        for m in replies["mappers"]
        if "status_code_filter" in m["filter"]  # not the playground page's own mapper
    }
    # Every status Envoy answers with by itself here: bad JSON, no route,
    # body or headers too large, overload, router down, timeout.
    assert set(bodies) == set(EDGE_ERRORS) == {400, 404, 413, 429, 431, 503, 504}
    for status, error in EDGE_ERRORS.items():
        assert bodies[status]["json_format"] == _expected_body(error), status
        assert bodies[status]["content_type"] == "application/json"
    assert replies["body_format"]["json_format"] == _expected_body(EDGE_DEFAULT)
    assert EDGE_ERRORS[413].reason is Reason.REQUEST_TOO_LARGE
    assert EDGE_ERRORS[503].reason is Reason.ROUTER_UNAVAILABLE


def test_the_413_message_names_envoys_real_limit():
    hcm = _hcm()
    filters = {f["name"]: f for f in hcm["http_filters"]}
    limit = filters["envoy.filters.http.buffer"]["typed_config"]["max_request_bytes"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    per_route = {r["typed_per_filter_config"]["envoy.filters.http.buffer"]["buffer"][
        "max_request_bytes"] for r in routes
        if "envoy.filters.http.buffer" in r.get("typed_per_filter_config", {})}
    assert per_route == {limit}
    assert EDGE_ERRORS[413].metadata == {"limit_bytes": str(limit)}
    assert f"({limit} bytes)" in EDGE_ERRORS[413].message


OPENAI_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models",
                "/v1/models/"}
# Every other path under /v1/ is OpenAI's too (its 404 in OpenAI's shape),
# after the native HTTP/JSON routes.
OPENAI_REST = "/v1/"


def test_openai_routes_go_to_the_openai_listener_untranscoded():
    config = yaml.safe_load(render.render())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    routes = [r for r in routes if "route" in r]  # not the playground's direct responses
    openai = [r for r in routes if r["route"]["cluster"] == "openai"]
    paths = [r["match"].get("path") or r["match"].get("prefix") for r in openai]
    assert set(paths[:-1]) == OPENAI_PATHS and paths[-1] == OPENAI_REST
    # They come before the transcoded routes, and the rest of /v1/ after them.
    first_router = next(i for i, r in enumerate(routes) if r["route"]["cluster"] == "router")
    assert all(routes.index(r) < first_router for r in openai[:-1])
    native = [r["match"].get("path") or r["match"].get("prefix") for r in routes
              if r["route"]["cluster"] == "router"]
    assert routes.index(openai[-1]) > routes.index(
        next(r for r in routes if r["match"].get("prefix") == "/v1/mesh/"))
    assert {"/v1/generate", "/v1/generate_stream", "/v1/mesh/"} <= set(native)
    for route in openai:
        filters = route["typed_per_filter_config"]
        assert filters["envoy.filters.http.grpc_json_transcoder"]["disabled"] is True
        assert filters["envoy.filters.http.buffer"]["buffer"]["max_request_bytes"] == 1048576
        # Streaming or not is in the body: the router bounds the time, not Envoy.
        assert route["route"]["timeout"] == "0s"
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "openai"]
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http_protocol_options" in options["explicit_http_config"]  # HTTP/1.1
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert address["address"]["socket_address"]["port_value"] == 50052


def test_envoys_own_replies_on_openai_routes_are_openai_errors():
    config = yaml.safe_load(render.render())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    # The refusals by response flag come first (their own test, below).
    flagged, _ = _flag_mappers(config)
    mappers = [m for m in hcm["typed_config"]["local_reply_config"]["mappers"]
               if m not in flagged]
    openai = [m for m in mappers
              if "error" in m.get("body_format_override", {}).get("json_format", {})]
    statuses = set()
    for mapper in openai:
        path, *status = mapper["filter"]["and_filter"]["filters"]
        regex = path["header_filter"]["header"]["string_match"]["safe_regex"]["regex"]
        for url in ("/v1/chat/completions", "/v1/completions", "/v1/models",
                    "/v1/models/qwen2", "/v1/models?x=1"):
            assert re.match(regex, url), url
        for url in ("/v1/generate", "/v1/mesh/models", "/v1/completionsx"):
            assert not re.match(regex, url), url
        if "status_code_filter" in status[0]:
            statuses.add(status[0]["status_code_filter"]["comparison"]["value"]["default_value"])
        error = mapper["body_format_override"]["json_format"]["error"]
        assert set(error) == {"message", "type", "code"}
    rows, _ = render._edge_errors()
    assert statuses == set(rows)  # every row of the error table's EDGE_ERRORS
    assert len(openai) == len(statuses) + 1  # and one for any other status
    # Before the native mappers, which match on status alone.
    native = [i for i, m in enumerate(mappers) if "code" in m.get(
        "body_format_override", {}).get("json_format", {})]
    assert max(mappers.index(m) for m in openai) < min(native)


def _flag_mappers(config: dict) -> tuple[list[dict], list[dict]]:
    mappers = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["local_reply_config"]["mappers"]

    def flags(f: dict) -> list[str]:
        inner = f.get("and_filter", {}).get("filters", [f])
        return [x["response_flag_filter"]["flags"][0] for x in inner
                if "response_flag_filter" in x]

    return [m for m in mappers if flags(m["filter"])], mappers


def test_envoys_overflow_is_a_429_in_each_apis_shape():
    import base64

    from google.rpc import error_details_pb2, status_pb2

    from services.common.errors import EDGE_FLAGS

    refusal = EDGE_FLAGS["UO"]
    assert refusal.reason is Reason.OVERLOADED and refusal.retry_after == 1.0
    flagged, mappers = _flag_mappers(yaml.safe_load(render.render()))
    assert len(flagged) == 3  # gRPC, OpenAI, HTTP/JSON
    # Before the rows by status, which would answer 503 ROUTER_UNAVAILABLE.
    assert mappers.index(flagged[-1]) < min(
        i for i, m in enumerate(mappers) if "status_code_filter" in m["filter"])
    assert {m["status_code"] for m in flagged} == {429}
    grpc_reply, openai_reply, native = flagged
    headers = {h["header"]["key"]: h["header"]["value"] for h in grpc_reply["headers_to_add"]}
    assert headers["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    status = status_pb2.Status.FromString(base64.b64decode(headers["grpc-status-details-bin"]))
    # gRPC clients check the Status against grpc-status and grpc-message (the body).
    assert status.code == 8
    assert status.message == grpc_reply["body_format_override"]["text_format_source"][
        "inline_string"] == refusal.message
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and info.reason == "OVERLOADED"
    assert status.details[1].Unpack(retry) and retry.retry_delay.seconds == 1
    for reply in (openai_reply, native):
        assert reply["headers_to_add"][0]["header"] == {"key": "retry-after", "value": "1"}
    assert openai_reply["body_format_override"]["json_format"]["error"] == {
        "message": refusal.message, "type": "rate_limit_error", "code": "overloaded"}
    body = native["body_format_override"]["json_format"]
    assert body["code"] == 8 and body["details"][0]["reason"] == "OVERLOADED"
    assert body["details"][1] == {"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                  "retry_delay": "1s"}


def test_envoys_limits_sit_just_above_the_routers_bound():
    from services.router.core import DEFAULT_MAX_TOTAL_IN_FLIGHT

    for bound, rendered in ((DEFAULT_MAX_TOTAL_IN_FLIGHT, render.render()),
                            (4, render.render(EDGE_MAX_REQUESTS=render.edge_max_requests(4)))):
        limit = render.edge_max_requests(bound)
        assert bound < limit <= bound * 1.25 + 1
        clusters = yaml.safe_load(rendered)["static_resources"]["clusters"]
        for cluster in clusters:
            if cluster["name"] in ("router", "openai"):
                (thresholds,) = cluster["circuit_breakers"]["thresholds"]
                assert thresholds["max_requests"] == thresholds["max_pending_requests"] == limit
