"""A small OTLP trace receiver: what a collector does on arrival, and no more.

    python scripts/otlp_receiver.py [--grpc-port 4317] [--http-port 4318]

Serves OpenTelemetry's `collector.trace.v1.TraceService/Export` over gRPC
(OTEL_EXPORTER_OTLP_PROTOCOL=grpc, and Envoy's `grpc_service`) and
`POST /v1/traces` with a protobuf body over HTTP (http/protobuf, Envoy's
`http_service`), both from the opentelemetry-proto messages, and prints
every span as one JSON line. Tests and benchmarks start it in-process
(`OtlpReceiver`) and read the spans it holds.
"""

from __future__ import annotations

import argparse
import gzip
import json
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

KINDS = {
    trace_pb2.Span.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED",
    trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL",
    trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
    trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER",
}
STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


def value(v: common_pb2.AnyValue) -> Any:
    """An OTLP AnyValue as plain Python."""
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind) if kind else None


def attributes(items: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in items}


def spans_of(request: trace_service_pb2.ExportTraceServiceRequest) -> list[dict[str, Any]]:
    """Every span of an export request, flattened, with its service.name."""
    out = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append({
                    "service": resource.get("service.name", ""),
                    "resource": resource,
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(),
                    "name": span.name,
                    "kind": KINDS.get(span.kind, str(span.kind)),
                    "start": span.start_time_unix_nano,
                    "end": span.end_time_unix_nano,
                    "attributes": attributes(span.attributes),
                    "events": [
                        {"name": e.name, "time": e.time_unix_nano,
                         "attributes": attributes(e.attributes)}
                        for e in span.events
                    ],
                    "status": {"code": STATUS.get(span.status.code, str(span.status.code)),
                               "message": span.status.message},
                })
    return out


class OtlpReceiver:
    """Receives spans over OTLP/gRPC and OTLP/HTTP and keeps them in memory."""

    def __init__(self, on_span: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._lock = threading.Lock()
        # Export requests as they came; flattened only when read, so that
        # receiving costs little next to what is being measured.
        self._requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._spans: list[dict[str, Any]] = []
        self._on_span = on_span
        self.exports = 0
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None
        self.grpc_port = 0
        self.http_port = 0

    # -- receiving -------------------------------------------------------------------

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._lock:
            self._requests.append(request)
            self.exports += 1
        if self._on_span is not None:
            for span in spans_of(request):
                self._on_span(span)

    def start(self, host: str = "127.0.0.1", grpc_port: int = 0, http_port: int = 0) -> None:
        receiver = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(
                self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
            ) -> trace_service_pb2.ExportTraceServiceResponse:
                receiver.add(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
        self.grpc_port = server.add_insecure_port(f"{host}:{grpc_port}")
        server.start()
        self._grpc = server

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.path != "/v1/traces":
                    self._reply(404, b"")
                    return
                body = self._body()
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                try:
                    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                except Exception:  # a body that is not the message
                    self._reply(400, b"")
                    return
                receiver.add(request)
                self._reply(200, trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

            def _body(self) -> bytes:
                if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks: list[bytes] = []  # Envoy's http_service streams the body in chunks
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer((host, http_port), Handler)
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(0)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    # -- reading ---------------------------------------------------------------------

    @property
    def spans(self) -> list[dict[str, Any]]:
        with self._lock:
            requests, self._requests = self._requests, []
        flat = [span for request in requests for span in spans_of(request)]
        with self._lock:
            self._spans.extend(flat)
            return list(self._spans)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()
            self._spans.clear()

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        return [s for s in self.spans if s["trace_id"] == trace_id]

    def wait_for(
        self, condition: Callable[[list[dict[str, Any]]], bool], timeout: float = 20.0
    ) -> list[dict[str, Any]]:
        """The spans, once `condition(spans)` holds; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans
            if condition(spans):
                return spans
            if time.monotonic() > deadline:
                names = [(s["service"], s["name"]) for s in spans]
                raise AssertionError(f"spans not there after {timeout}s; got {names}")
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=4317)
    p.add_argument("--http-port", type=int, default=4318)
    args = p.parse_args(argv)
    receiver = OtlpReceiver(on_span=lambda span: print(json.dumps(span), flush=True))
    receiver.start(args.host, args.grpc_port, args.http_port)
    print(f"OTLP receiver: grpc {args.host}:{receiver.grpc_port}, "
          f"http http://{args.host}:{receiver.http_port}/v1/traces", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        receiver.stop()


if __name__ == "__main__":
    main()
