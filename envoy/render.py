"""Render Envoy's configs from envoy.template.yaml.

`python envoy/render.py` writes envoy.local.yaml, envoy.compose.yaml and
envoy.k8s.yaml (compose's, without the tracer: deploy/k8s takes a copy);
`--check` fails when they differ from what the template gives. Tests and the
launcher call `render()` with their own ports, and with the OTEL_* variables
of their environment (`otel=`) to turn on Envoy's OpenTelemetry tracer.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import string
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "envoy.template.yaml"
PLAYGROUND = HERE.parent / "web" / "playground"
# Envoy's limit on a direct response's body (its default is 4 KiB).
PLAYGROUND_MAX_BYTES = 262144

PROFILES: dict[str, dict[str, str]] = {
    "local": {
        "ADMIN_ADDRESS": "127.0.0.1",
        "ADMIN_PORT": "9901",
        "LISTEN_ADDRESS": "127.0.0.1",
        "LISTEN_PORT": "8000",
        "ROUTER_HOST": "127.0.0.1",
        "ROUTER_PORT": "50051",
        "OPENAI_PORT": "50052",
        "ROUTER_DISCOVERY": "STATIC",
        "DESCRIPTOR": "gen/llmmesh.binpb",
    },
    "compose": {
        "ADMIN_ADDRESS": "0.0.0.0",
        "ADMIN_PORT": "9901",
        "LISTEN_ADDRESS": "0.0.0.0",
        "LISTEN_PORT": "8000",
        "ROUTER_HOST": "router",
        "ROUTER_PORT": "50051",
        "OPENAI_PORT": "50052",
        "ROUTER_DISCOVERY": "STRICT_DNS",
        "DESCRIPTOR": "/etc/envoy/llmmesh.binpb",
    },
    "k8s": {
        "ADMIN_ADDRESS": "0.0.0.0",
        "ADMIN_PORT": "9901",
        "LISTEN_ADDRESS": "0.0.0.0",
        "LISTEN_PORT": "8000",
        "ROUTER_HOST": "router",
        "ROUTER_PORT": "50051",
        "ROUTER_DISCOVERY": "STRICT_DNS",
        "DESCRIPTOR": "/etc/envoy/llmmesh.binpb",
    },
}


def _edge_errors() -> tuple[dict[int, Any], Any]:
    """services.common.errors' EDGE_ERRORS and EDGE_DEFAULT (the one error
    table), imported from the checkout this file lives in."""
    if str(HERE.parent) not in sys.path:
        sys.path.insert(0, str(HERE.parent))
    from services.common import errors

    return dict(errors.EDGE_ERRORS), errors.EDGE_DEFAULT


def _json_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _reply_body(error: Any, pad: str) -> list[str]:
    """A json_format body shaped like the transcoder's errors: the reason's
    gRPC code, the message, and a google.rpc.ErrorInfo."""
    import grpc

    from services.common.errors import DOMAIN, TABLE

    code = grpc.StatusCode[TABLE[error.reason].code].value[0]
    lines = [
        f"{pad}json_format:",
        f"{pad}  code: {code}",
        f"{pad}  message: {_json_str(error.message)}",
        f"{pad}  details:",
        f'{pad}    - "@type": type.googleapis.com/google.rpc.ErrorInfo',
        f"{pad}      reason: {error.reason.value}",
        f"{pad}      domain: {DOMAIN}",
    ]
    if error.metadata:
        lines.append(f"{pad}      metadata:")
        lines += [f"{pad}        {k}: {_json_str(v)}" for k, v in error.metadata.items()]
    lines += _retry_info(error, pad)
    lines.append(f"{pad}content_type: application/json")
    return lines


def _retry_info(error: Any, pad: str) -> list[str]:
    if error.retry_after is None:
        return []
    return [
        f'{pad}    - "@type": type.googleapis.com/google.rpc.RetryInfo',
        f"{pad}      retry_delay: {error.retry_after:g}s",
    ]


def _grpc_status_bin(error: Any) -> str:
    """grpc-status-details-bin of the error: a google.rpc.Status with the
    ErrorInfo and RetryInfo the router's own refusals carry."""
    import grpc
    from google.protobuf import duration_pb2
    from google.rpc import error_details_pb2, status_pb2

    from services.common.errors import DOMAIN, TABLE

    status = status_pb2.Status(
        code=grpc.StatusCode[TABLE[error.reason].code].value[0], message=error.message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(
        reason=error.reason.value, domain=DOMAIN, metadata=dict(error.metadata or {})))
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after * 1000))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return base64.b64encode(status.SerializeToString()).decode()


def _header(pad: str, key: str, value: str) -> list[str]:
    return [
        f"{pad}    - header: {{ key: {key}, value: {_json_str(value)} }}",
        f"{pad}      append_action: OVERWRITE_IF_EXISTS_OR_ADD",
    ]


def _flag_mappers(indent: int = 20) -> str:
    """Envoy's refusals by response flag (errors.EDGE_FLAGS), answered with
    the reason's status in each API's shape: a gRPC status with ErrorInfo and
    RetryInfo to gRPC clients, OpenAI's error JSON on the OpenAI routes, the
    transcoder's JSON elsewhere; Retry-After on HTTP."""
    _edge_errors()  # puts the checkout on sys.path
    import grpc

    from services.common.errors import EDGE_FLAGS, HTTP_STATUS, TABLE
    from services.openai.errors import error_type

    pad = " " * indent
    out: list[str] = []
    for flag, error in sorted(EDGE_FLAGS.items()):
        code_name = TABLE[error.reason].code
        status = HTTP_STATUS[code_name]
        flag_filter = f"response_flag_filter: {{ flags: [{flag}] }}"
        retry = ([] if error.retry_after is None else
                 _header(pad, "retry-after", f"{max(1, math.ceil(error.retry_after))}"))
        # gRPC clients: a gRPC request not transcoded (a transcoded one
        # carries its original path in x-envoy-original-path).
        out += [
            f"{pad}- filter:",
            f"{pad}    and_filter:",
            f"{pad}      filters:",
            f"{pad}      - {flag_filter}",
            f"{pad}      - header_filter:",
            f"{pad}          header:",
            f"{pad}            name: content-type",
            f"{pad}            string_match: {{ prefix: application/grpc }}",
            f"{pad}      - header_filter:",
            f"{pad}          header:",
            f"{pad}            name: x-envoy-original-path",
            f"{pad}            present_match: true",
            f"{pad}            invert_match: true",
            f"{pad}  status_code: {status}",
            f"{pad}  headers_to_add:",
            *_header(pad, "grpc-status", str(grpc.StatusCode[code_name].value[0])),
            *_header(pad, "grpc-status-details-bin", _grpc_status_bin(error)),
            f"{pad}  body_format_override:",
            # Envoy sends the body as grpc-message: the Status's own message.
            f"{pad}    text_format_source: {{ inline_string: {_json_str(error.message)} }}",
        ]
        # The OpenAI routes: OpenAI's error JSON.
        out += [
            f"{pad}- filter:",
            f"{pad}    and_filter:",
            f"{pad}      filters:",
            f"{pad}      - {flag_filter}",
            f"{pad}      - header_filter:",
            f"{pad}          header:",
            f'{pad}            name: ":path"',
            f"{pad}            string_match: {{ safe_regex: {{ regex: '{OPENAI_PATHS}' }} }}",
            f"{pad}  status_code: {status}",
            *([f"{pad}  headers_to_add:", *retry] if retry else []),
            f"{pad}  body_format_override:",
            f"{pad}    json_format:",
            f"{pad}      error:",
            f"{pad}        message: {_json_str(error.message)}",
            f"{pad}        type: {error_type(status)}",
            f"{pad}        code: {error.reason.label}",
            f"{pad}    content_type: application/json",
        ]
        # The native HTTP/JSON API: the transcoder's error JSON.
        out += [
            f"{pad}- filter:",
            f"{pad}    {flag_filter}",
            f"{pad}  status_code: {status}",
            *([f"{pad}  headers_to_add:", *retry] if retry else []),
            f"{pad}  body_format_override:",
            *_reply_body(error, pad + "    "),
        ]
    return "\n".join(out)


def _mappers(indent: int = 20) -> str:
    pad = " " * indent
    rows, _ = _edge_errors()
    out = []
    for status, error in sorted(rows.items()):
        out += [
            f"{pad}- filter:",
            f"{pad}    status_code_filter:",
            f"{pad}      comparison:",
            f"{pad}        op: EQ",
            f"{pad}        value: {{ default_value: {status}, runtime_key: local_reply_{status} }}",
            f"{pad}  body_format_override:",
            *_reply_body(error, pad + "    "),
        ]
    return "\n".join(out)


def playground_page() -> tuple[str, str]:
    """The playground as one HTML document, and its Content-Security-Policy.

    web/playground/index.html links playground.css and playground.js; here
    both are inlined, so the page is one response with no other request, and
    the policy allows exactly these two inline blocks (by their SHA-256) and
    requests to this origin, nothing else.
    """
    html = (PLAYGROUND / "index.html").read_text(encoding="utf-8")
    style = "\n" + (PLAYGROUND / "playground.css").read_text(encoding="utf-8")
    script = "\n" + (PLAYGROUND / "playground.js").read_text(encoding="utf-8")
    for tag in ('<link rel="stylesheet" href="playground.css">',
                '<script src="playground.js"></script>'):
        if html.count(tag) != 1:
            raise ValueError(f"web/playground/index.html must contain {tag} once")
    html = html.replace('<link rel="stylesheet" href="playground.css">', f"<style>{style}</style>")
    html = html.replace('<script src="playground.js"></script>', f"<script>{script}</script>")
    html = html.replace("\r", "")
    size = len(html.encode("utf-8"))
    if size > PLAYGROUND_MAX_BYTES:
        raise ValueError(f"the playground is {size} bytes, over {PLAYGROUND_MAX_BYTES}")

    def digest(text: str) -> str:
        return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()

    csp = (
        "default-src 'none'; "
        f"script-src 'sha256-{digest(script)}'; style-src 'sha256-{digest(style)}'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return html, csp


def _playground_routes(indent: int = 24) -> str:
    """Routes serving the playground at `/` from Envoy itself (a direct response).

    The transcoder is off for them: it would answer 404 to a path that is
    no gRPC method.
    """
    html, csp = playground_page()
    pad = " " * indent
    body = "\n".join(f"{pad}        {line}".rstrip() for line in html.splitlines())
    headers = [
        ("content-security-policy", csp),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-cache"),
    ]
    out = [
        f"{pad}- match:",
        f'{pad}    path: "/"',
        f"{pad}    headers:",
        f'{pad}      - name: ":method"',
        f'{pad}        string_match: {{ safe_regex: {{ regex: "GET|HEAD" }} }}',
        f"{pad}  direct_response:",
        f"{pad}    status: 200",
        f"{pad}    body:",
        f"{pad}      inline_string: |",
        body,
        f"{pad}  response_headers_to_add:",
    ]
    for key, value in headers:
        out += [f'{pad}    - header: {{ key: {key}, value: "{value}" }}',
                f"{pad}      append_action: OVERWRITE_IF_EXISTS_OR_ADD"]
    out += [
        f"{pad}  typed_per_filter_config:",
        f"{pad}    envoy.filters.http.grpc_json_transcoder:",
        f'{pad}      "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig',
        f"{pad}      disabled: true",
    ]
    return "\n".join(out)


def _playground_mapper(indent: int = 20) -> str:
    """A local reply mapper that keeps the page as it is.

    Envoy passes direct responses through local_reply_config, whose JSON
    body format would wrap the page; this mapper, for the page's path and
    status only, returns the body unchanged as text/html.
    """
    pad = " " * indent
    return "\n".join([
        f"{pad}- filter:",
        f"{pad}    and_filter:",
        f"{pad}      filters:",
        f"{pad}        - status_code_filter:",
        f"{pad}            comparison:",
        f"{pad}              op: EQ",
        f"{pad}              value: {{ default_value: 200, runtime_key: local_reply_200 }}",
        f"{pad}        - header_filter:",
        f"{pad}            header:",
        f'{pad}              name: ":path"',
        f'{pad}              string_match: {{ safe_regex: {{ regex: "/([?].*)?" }} }}',
        f"{pad}  body_format_override:",
        f'{pad}    text_format_source: {{ inline_string: "%LOCAL_REPLY_BODY%" }}',
        f'{pad}    content_type: "text/html; charset=utf-8"',
    ])


def _default_body(indent: int = 20) -> str:
    _, default = _edge_errors()
    return "\n".join(_reply_body(default, " " * indent))


# The OpenAI-compatible routes (the router's OpenAI listener): Envoy's own
# replies there are OpenAI's error JSON, which OpenAI's SDKs read, with the
# same rows of the error table.
OPENAI_PATHS = r"^/v1/(chat/completions|completions|responses|models(/.*)?)([?].*)?$"


def _openai_mappers(indent: int = 20) -> str:
    rows, default = _edge_errors()  # puts the checkout on sys.path
    from services.openai.errors import error_type

    pad = " " * indent
    path = [
        f"{pad}      - header_filter:",
        f"{pad}          header:",
        f'{pad}            name: ":path"',
        f"{pad}            string_match: {{ safe_regex: {{ regex: '{OPENAI_PATHS}' }} }}",
    ]
    out = []
    for status, error in [*sorted(rows.items()), (0, default)]:
        status_filter = [
            f"{pad}      - status_code_filter:",
            f"{pad}          comparison:",
            f"{pad}            op: EQ",
            f"{pad}            value: {{ default_value: {status}, "
            f"runtime_key: local_reply_openai_{status} }}",
        ] if status else [
            # Any other status: a filter that always holds.
            f"{pad}      - not_health_check_filter: {{}}",
        ]
        out += [
            f"{pad}- filter:",
            f"{pad}    and_filter:",
            f"{pad}      filters:",
            *path,
            *status_filter,
            f"{pad}  body_format_override:",
            f"{pad}    json_format:",
            f"{pad}      error:",
            f"{pad}        message: {_json_str(error.message)}",
            f"{pad}        type: {error_type(status or 500)}",
            f"{pad}        code: {error.reason.label}",
            f"{pad}    content_type: application/json",
        ]
    return "\n".join(out)


def edge_max_requests(router_bound: int) -> int:
    """Envoy's limit on requests in flight to the router (its circuit
    breakers): just above the router's own bound, so the router's refusal
    comes first, and Envoy's only for what arrives faster than the router
    refuses."""
    return router_bound + max(1, router_bound // 8)


def _router_bound() -> int:
    _edge_errors()  # puts the checkout on sys.path
    from services.router.core import DEFAULT_MAX_TOTAL_IN_FLIGHT

    return int(DEFAULT_MAX_TOTAL_IN_FLIGHT)


def render(otel: Mapping[str, str] | None = None, **values: str | int) -> str:
    """The template with `values` over the local profile's; Envoy's tracer
    exports to the OTLP endpoint of `otel` (OTEL_* variables) when it has one."""
    merged = {**PROFILES["local"],
              "EDGE_MAX_REQUESTS": str(edge_max_requests(_router_bound())),
              **{k: str(v) for k, v in values.items()}}
    # First match wins: the refusals by flag before the rows by status.
    merged["LOCAL_REPLY_MAPPERS"] = "\n".join((_flag_mappers(), _openai_mappers(), _mappers()))
    merged["PLAYGROUND_ROUTES"] = _playground_routes()
    merged["PLAYGROUND_REPLY_MAPPER"] = _playground_mapper()
    merged["PLAYGROUND_MAX_BYTES"] = str(PLAYGROUND_MAX_BYTES)
    merged["LOCAL_REPLY_DEFAULT"] = _default_body()
    merged.update(tracing_blocks(otel or {}))
    return string.Template(TEMPLATE.read_text(encoding="utf-8")).substitute(merged)


# -- tracing ---------------------------------------------------------------------------
#
# Envoy's OpenTelemetry tracer, set from the same OTEL_* variables the Python
# services read: OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _PROTOCOL (grpc or
# http/protobuf), _HEADERS, _TIMEOUT; OTEL_BSP_SCHEDULE_DELAY and
# OTEL_BSP_MAX_EXPORT_BATCH_SIZE become its flush interval and batch (runtime
# keys tracing.opentelemetry.*); OTEL_TRACES_SAMPLER(_ARG) its sampling. It
# continues a client's `traceparent` and sends its own span's to the router.

# docker compose: every process exports to the collector (docker-compose.yml).
# Kubernetes (deploy/k8s, a copy of envoy.k8s.yaml) runs no collector: no tracer.
OTEL_PROFILES: dict[str, dict[str, str]] = {
    "compose": {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
    },
}
OTLP_CLUSTER = "otlp_collector"


def _otlp_headers(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            pairs.append((unquote(key.strip()).lower(), unquote(value.strip())))
    return pairs


def _block(data: Any, indent: int) -> str:
    import yaml

    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=200)
    return "\n".join(" " * indent + line for line in text.rstrip("\n").splitlines())


def tracing_blocks(env: Mapping[str, str]) -> dict[str, str]:
    """The TRACING, TRACING_CLUSTER and TRACING_RUNTIME placeholders for `env`:
    empty (no tracer) unless an OTLP endpoint is set."""
    blocks = {"TRACING": "", "TRACING_CLUSTER": "", "TRACING_RUNTIME": ""}
    signal = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    endpoint = signal or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint or env.get("OTEL_SDK_DISABLED", "").lower() == "true" or (
        env.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none"
    ):
        return blocks
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
    if protocol not in ("grpc", "http/protobuf"):
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r}: grpc or http/protobuf")
    url = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    if url.hostname is None:
        raise ValueError(f"no host in the OTLP endpoint {endpoint!r}")
    tls = url.scheme == "https"
    port = url.port or (443 if tls else 4317 if protocol == "grpc" else 4318)
    headers = _otlp_headers(
        env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS") or ""
    )
    timeout_ms = int(env.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
                     or env.get("OTEL_EXPORTER_OTLP_TIMEOUT") or 10_000)
    timeout = f"{timeout_ms / 1000:g}s"
    config: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
    }
    if protocol == "grpc":
        service: dict[str, Any] = {"envoy_grpc": {"cluster_name": OTLP_CLUSTER},
                                   "timeout": timeout}
        if headers:
            service["initial_metadata"] = [{"key": k, "value": v} for k, v in headers]
        config["grpc_service"] = service
    else:
        # A signal-specific endpoint is the whole URL; the generic one a base.
        path = url.path if signal else url.path.rstrip("/") + "/v1/traces"
        http: dict[str, Any] = {
            "http_uri": {"uri": f"{url.scheme}://{url.hostname}:{port}{path or '/'}",
                         "cluster": OTLP_CLUSTER, "timeout": timeout},
        }
        if headers:
            http["request_headers_to_add"] = [
                {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                for k, v in headers
            ]
        config["http_service"] = http
    config["service_name"] = "envoy"
    sampler = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    percent = 100.0
    if sampler in ("always_off", "parentbased_always_off"):
        percent = 0.0
    elif sampler in ("traceidratio", "parentbased_traceidratio"):
        percent = 100.0 * float(env.get("OTEL_TRACES_SAMPLER_ARG") or 1.0)
    tracing = {"tracing": {
        "provider": {"name": "envoy.tracers.opentelemetry", "typed_config": config},
        "random_sampling": {"value": percent},
    }}
    cluster: dict[str, Any] = {
        "name": OTLP_CLUSTER,
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": OTLP_CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {
                "address": url.hostname, "port_value": port}}}},
        ]}]},
    }
    if protocol == "grpc":
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3"
                         ".HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        }
    if tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
                         ".UpstreamTlsContext",
                "sni": url.hostname,
            },
        }
    runtime = {"tracing.opentelemetry.flush_interval_ms":
               int(env.get("OTEL_BSP_SCHEDULE_DELAY") or 5000)}
    if env.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE"):
        runtime["tracing.opentelemetry.min_flush_spans"] = int(
            env["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"])
    blocks["TRACING"] = _block(tracing, 16)
    blocks["TRACING_CLUSTER"] = _block([cluster], 4)
    blocks["TRACING_RUNTIME"] = _block({"layered_runtime": {"layers": [
        {"name": "tracing", "static_layer": runtime},
    ]}}, 0)
    return blocks


def with_tls(text: str, cert: str, key: str, ca: str) -> str:
    """A rendered config with TLS at the edge and mutual TLS to the router.

    Clients connect over TLS (HTTP/1.1 or h2 by ALPN; no client certificate
    asked at the edge). Envoy presents `cert` to the router (both its gRPC
    and its OpenAI listener), and accepts only a router certificate that `ca`
    signed and that names `router`.
    """
    import yaml

    config = yaml.safe_load(text)
    identity = {"certificate_chain": {"filename": cert}, "private_key": {"filename": key}}
    listener = config["static_resources"]["listeners"][0]
    listener["filter_chains"][0]["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
                     ".DownstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificates": [identity],
            },
        },
    }
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] in UPSTREAM_ALPN:
            cluster["transport_socket"] = _upstream_tls(
                identity, ca, UPSTREAM_ALPN[cluster["name"]])
    return str(yaml.safe_dump(config, sort_keys=False))


# The router's two listeners: gRPC over h2, the OpenAI API over HTTP/1.1.
UPSTREAM_ALPN = {"router": "h2", "openai": "http/1.1"}


def _upstream_tls(identity: dict[str, Any], ca: str, alpn: str) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
                     ".UpstreamTlsContext",
            "sni": "router",
            "common_tls_context": {
                "alpn_protocols": [alpn],
                "tls_certificates": [identity],
                "validation_context": {
                    "trusted_ca": {"filename": ca},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": "router"}}
                    ],
                },
            },
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    for name, values in PROFILES.items():
        path = HERE / f"envoy.{name}.yaml"
        text = render(otel=OTEL_PROFILES.get(name), **values)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"stale: {', '.join(stale)}; run `make gen`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
