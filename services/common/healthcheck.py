"""Container health check for the mesh's images and compose services.

    python -m services.common.healthcheck [TARGET] [--service NAME] [--timeout S]

TARGET is either `host:port`, asked over grpc.health.v1 (the router and the
adapters), or an `http://` URL that must answer 2xx (the CPU backend's
/health). Without TARGET it checks `127.0.0.1:$LLMMESH_PORT`, so an image's
HEALTHCHECK follows the port the container was configured with.

Exit status 0 when healthy, 1 when not (Docker's convention), 2 on bad usage;
one line on stdout says why, which `docker inspect` shows.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

HEALTHY, UNHEALTHY, USAGE = 0, 1, 2


def check_grpc(address: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """Whether grpc.health.v1 at `address` reports SERVING for `service`."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            name = code.name if code is not None else "ERROR"
            return False, f"{address} {service or '(overall)'}: {name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, (
        f"{address} {service or '(overall)'}: {status}"
    )


def check_http(url: str, timeout: float = 3.0) -> tuple[bool, str]:
    """Whether GET `url` answers with a 2xx status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return 200 <= reply.status < 300, f"{url}: {reply.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {exc}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.common.healthcheck", description=__doc__)
    p.add_argument("target", nargs="?", help="host:port (gRPC health) or http(s):// URL")
    p.add_argument("--service", default="", help="grpc.health.v1 service name ('' = overall)")
    p.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    target = args.target
    if target is None:
        port = os.environ.get("LLMMESH_PORT")
        if not port:
            print("no TARGET given and LLMMESH_PORT is not set")
            return USAGE
        target = f"127.0.0.1:{port}"
    if target.startswith(("http://", "https://")):
        ok, why = check_http(target, args.timeout)
    else:
        ok, why = check_grpc(target, args.service, args.timeout)
    print(why)
    return HEALTHY if ok else UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
