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
