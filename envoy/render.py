"""Render Envoy's configs from envoy.template.yaml.

`python envoy/render.py` writes envoy.local.yaml and envoy.compose.yaml;
`--check` fails when they differ from what the template gives. Tests and the
launcher call `render()` with their own ports.
"""

from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "envoy.template.yaml"

PROFILES: dict[str, dict[str, str]] = {
    "local": {
        "ADMIN_ADDRESS": "127.0.0.1",
        "ADMIN_PORT": "9901",
        "LISTEN_ADDRESS": "127.0.0.1",
        "LISTEN_PORT": "8000",
        "ROUTER_HOST": "127.0.0.1",
        "ROUTER_PORT": "50051",
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
        "ROUTER_DISCOVERY": "STRICT_DNS",
        "DESCRIPTOR": "/etc/envoy/llmmesh.binpb",
    },
}

# Envoy's own replies, as the gRPC status each HTTP status stands for, so
# they read like the transcoder's errors.
LOCAL_REPLIES = [
    (400, 3, "INVALID_ARGUMENT"),
    (404, 5, "NOT_FOUND"),
    (413, 3, "INVALID_ARGUMENT"),
    (429, 8, "RESOURCE_EXHAUSTED"),
    (503, 14, "UNAVAILABLE"),
    (504, 4, "DEADLINE_EXCEEDED"),
]


def _mappers(indent: int = 20) -> str:
    pad = " " * indent
    out = []
    for status, code, name in LOCAL_REPLIES:
        out += [
            f"{pad}- filter:",
            f"{pad}    status_code_filter:",
            f"{pad}      comparison:",
            f"{pad}        op: EQ",
            f"{pad}        value: {{ default_value: {status}, runtime_key: local_reply_{status} }}",
            f"{pad}  body_format_override:",
            f"{pad}    json_format:",
            f"{pad}      code: {code}",
            f'{pad}      message: "{name}: %LOCAL_REPLY_BODY%"',
            f"{pad}      details: []",
            f"{pad}    content_type: application/json",
        ]
    return "\n".join(out)


def render(**values: str | int) -> str:
    """The template with `values` over the local profile's."""
    merged = {**PROFILES["local"], **{k: str(v) for k, v in values.items()}}
    merged["LOCAL_REPLY_MAPPERS"] = _mappers()
    return string.Template(TEMPLATE.read_text(encoding="utf-8")).substitute(merged)


def with_tls(text: str, cert: str, key: str, ca: str) -> str:
    """A rendered config with TLS at the edge and mutual TLS to the router.

    Clients connect over TLS (HTTP/1.1 or h2 by ALPN; no client certificate
    asked at the edge). Envoy presents `cert` to the router, and accepts
    only a router certificate that `ca` signed and that names `router`.
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
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "router")
    cluster["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
                     ".UpstreamTlsContext",
            "sni": "router",
            "common_tls_context": {
                "alpn_protocols": ["h2"],
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
    return str(yaml.safe_dump(config, sort_keys=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    for name, values in PROFILES.items():
        path = HERE / f"envoy.{name}.yaml"
        text = render(**values)
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
