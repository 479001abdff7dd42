"""An OTLP/HTTP trace receiver on a loopback port, standing in for a collector (tests/test_tracing.py, the bench).

Processes started with OTEL_EXPORTER_OTLP_ENDPOINT=`Collector.url` send their
spans to it as the OpenTelemetry SDK's exporter sends them to a real
collector (POST /v1/traces, protobuf, gzip when asked), and it answers as a
collector does. It decodes each request with opentelemetry-proto (the
exporter's own messages), counts the spans, and keeps them unless told not
to (the bench only counts). Not imported by `testing/__init__`: only the
tests and the benchmark that use it need opentelemetry-proto.
"""

import gzip
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from project import tracing


@dataclass
class Span:
    """One span as the collector received it: ids in hex ("" for no parent), attributes as Python values."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    service: str
    attributes: dict = field(default_factory=dict)
    links: list[tuple[str, str]] = field(default_factory=list)


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class Collector:
    """An OTLP/HTTP trace receiver on a free loopback port: POST /v1/traces, protobuf.

    `keep`: keep every span (`spans`, `trace`, `of_order`); without it only
    `span_count` and `requests` grow, so a benchmark's receiver does no more
    than decode. Runs in a thread of the calling process until `stop`.
    """

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self.spans: list[Span] = []
        #: spans received, kept or not
        self.span_count = 0
        #: export requests received (each a batch from one process)
        self.requests = 0
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                collector.receive(body)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):  # not on the test's or the bench's output
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="otlp-collector", daemon=True)
        self.thread.start()

    def receive(self, body: bytes) -> None:
        """Take one ExportTraceServiceRequest (serialized protobuf): count its spans, keep them if asked."""
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        count = 0
        spans = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes} if self.keep else {}
            for scope_spans in resource_spans.scope_spans:
                count += len(scope_spans.spans)
                if not self.keep:
                    continue
                for span in scope_spans.spans:
                    spans.append(
                        Span(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            name=span.name,
                            kind=span.kind,
                            service=resource.get("service.name", ""),
                            attributes={kv.key: _value(kv.value) for kv in span.attributes},
                            links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                        )
                    )
        with self.lock:
            self.requests += 1
            self.span_count += count
            self.spans.extend(spans)

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [span for span in self.spans if span.trace_id == trace_id]

    def of_order(self, order_id: int) -> list[Span]:
        with self.lock:
            return [span for span in self.spans if span.attributes.get(tracing.ORDER_ID) == order_id]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
