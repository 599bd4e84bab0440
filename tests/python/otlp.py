"""OTLP trace receivers on loopback for the integration tests: OTLP/gRPC and OTLP/HTTP protobuf.

Synchronous and pytest-friendly: each receiver serves from background threads on 127.0.0.1 on a
free port, and the test thread reads what it got or blocks until a condition holds.

    with otlp.receiver("grpc") as rx:                  # or "http/protobuf"
        sidecar = start_sidecar(config, extra_env=rx.env(service_name="llm-sidecar"))
        ...                                            # send a request through the sidecar
        spans = rx.wait_for(lambda spans: any(s.kind == "SERVER" for s in spans))
        server = rx.wait_for_span("POST /v1/chat/completions")
        assert server.resource["service.name"] == "llm-sidecar"

A collector that answers every export with an error: `otlp.receiver("grpc", fail=True)` (gRPC
UNAVAILABLE / HTTP 503; `fail=` also takes a `grpc.StatusCode` or an HTTP status, and `rx.fail`
can be flipped while the receiver runs). A collector that is not there at all:
`f"http://127.0.0.1:{otlp.unused_port()}"` (connections are refused).

Spans of rejected exports are not recorded (the exporter may retry them); every export request,
accepted or not, is counted in `rx.exports()`.
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import socket
import threading
import time
import zlib
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

PROTOCOLS = ("grpc", "http/protobuf")
TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class Span:
    """One received span, in plain Python values. Ids are lowercase hex; absent ids are ""."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str  # "SERVER", "CLIENT", "INTERNAL", "PRODUCER", "CONSUMER" or "UNSPECIFIED"
    attributes: dict
    status_code: str  # "UNSET", "OK" or "ERROR"
    status_message: str
    links: list  # [(trace_id, span_id)]
    events: list  # [(name, attributes)]
    start_time_unix_nano: int
    end_time_unix_nano: int
    resource: dict  # the resource attributes (service.name, k8s.pod.name, ...)
    scope: str  # the instrumentation scope's name

    @property
    def duration_ns(self) -> int:
        return self.end_time_unix_nano - self.start_time_unix_nano

    def __str__(self) -> str:
        parent = self.parent_span_id or "-"
        status = self.status_code + (f" {self.status_message!r}" if self.status_message else "")
        return (
            f"{self.name!r} {self.kind} trace={self.trace_id} span={self.span_id} parent={parent} "
            f"status={status} attrs={self.attributes} links={self.links} "
            f"service={self.resource.get('service.name')!r}"
        )


@dataclass(frozen=True)
class Export:
    """One export request as the receiver saw it."""

    accepted: bool
    spans: int  # spans in the request (recorded only when accepted)
    headers: dict = field(default_factory=dict)  # lowercase names: HTTP headers or gRPC metadata


def value(any_value):
    """An OTLP AnyValue as a Python value (str, bool, int, float, bytes, list, dict or None)."""
    kind = any_value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    if kind == "kvlist_value":
        return attributes(any_value.kvlist_value.values)
    return getattr(any_value, kind)


def attributes(key_values) -> dict:
    return {kv.key: value(kv.value) for kv in key_values}


def _enum_name(enum, number, prefix):
    try:
        return enum.Name(number).removeprefix(prefix)
    except ValueError:
        return str(number)


def spans_of(request) -> list[Span]:
    """The spans of an ExportTraceServiceRequest, flattened, with their resource attributes."""
    out = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                out.append(
                    Span(
                        name=s.name,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        kind=_enum_name(trace_pb2.Span.SpanKind, s.kind, "SPAN_KIND_"),
                        attributes=attributes(s.attributes),
                        status_code=_enum_name(trace_pb2.Status.StatusCode, s.status.code, "STATUS_CODE_"),
                        status_message=s.status.message,
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                        events=[(e.name, attributes(e.attributes)) for e in s.events],
                        start_time_unix_nano=s.start_time_unix_nano,
                        end_time_unix_nano=s.end_time_unix_nano,
                        resource=resource,
                        scope=scope_spans.scope.name,
                    )
                )
    return out


# Bound but never listening: connecting gets "connection refused", and while the socket stays
# open no other socket (the sidecar's own listeners included) can be given the port.
_HELD_PORTS = []


def unused_port() -> int:
    """A loopback port nothing listens on, for an unreachable collector; held for the session."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    _HELD_PORTS.append(sock)
    return sock.getsockname()[1]


class Receiver:
    """What one receiver got; shared by the gRPC and the HTTP transport."""

    def __init__(self, protocol, fail=False):
        self.protocol = protocol
        self.port = None
        self._cond = threading.Condition()
        self._spans = []
        self._exports = []
        self._problems = []  # malformed requests: (what, detail)
        self._fail = False
        self.fail = fail

    # --- configuration -------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The value for OTEL_EXPORTER_OTLP_ENDPOINT."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def traces_endpoint(self) -> str:
        """The value for OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (used as is, without /v1/traces appended)."""
        return self.endpoint + (TRACES_PATH if self.protocol == "http/protobuf" else "")

    def env(self, service_name=None, resource_attributes=None) -> dict:
        """Environment for an exporter (the sidecar) that sends here."""
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": self.protocol,
            # Flush batches quickly; harmless for an exporter that does not read it.
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        if service_name is not None:
            env["OTEL_SERVICE_NAME"] = service_name
        if resource_attributes:
            env["OTEL_RESOURCE_ATTRIBUTES"] = ",".join(f"{k}={v}" for k, v in resource_attributes.items())
        return env

    @property
    def fail(self):
        """False to accept exports; True or an error (grpc.StatusCode / HTTP status) to reject them."""
        return self._fail

    @fail.setter
    def fail(self, fail):
        if fail is True:
            fail = grpc.StatusCode.UNAVAILABLE if self.protocol == "grpc" else 503
        elif fail is not False:
            wanted, what = (grpc.StatusCode, "a grpc.StatusCode") if self.protocol == "grpc" else (int, "an HTTP status")
            if isinstance(fail, bool) or not isinstance(fail, wanted):
                raise ValueError(f"fail={fail!r}: a {self.protocol} receiver rejects with {what}")
            if self.protocol == "grpc" and fail == grpc.StatusCode.OK:
                raise ValueError("fail=grpc.StatusCode.OK is not an error")
            if self.protocol != "grpc" and not 400 <= fail <= 599:
                raise ValueError(f"fail={fail}: an HTTP error status is 4xx or 5xx")
        self._fail = fail

    # --- reading -------------------------------------------------------------------------

    def spans(self) -> list[Span]:
        """Every span received so far, in arrival order."""
        with self._cond:
            return list(self._spans)

    def exports(self) -> list[Export]:
        """Every export request received so far, accepted or rejected."""
        with self._cond:
            return list(self._exports)

    def clear(self):
        """Forgets what was received (spans, exports, malformed requests)."""
        with self._cond:
            self._spans.clear()
            self._exports.clear()
            self._problems.clear()

    def wait_for(self, predicate, timeout=10.0, what=None) -> list[Span]:
        """Blocks until predicate(spans) is true, then returns the spans; AssertionError on timeout."""
        __tracebackhide__ = True
        return self._wait(lambda: predicate(list(self._spans)), self._spans, timeout, what or "the spans")

    def wait_for_span(self, name, timeout=10.0, **attributes) -> Span:
        """The first span called `name` whose attributes include `attributes` (waits for it)."""
        __tracebackhide__ = True

        def matches(s):
            return s.name == name and all(s.attributes.get(k, _MISSING) == v for k, v in attributes.items())

        what = f"a span {name!r}" + (f" with {attributes}" if attributes else "")
        spans = self.wait_for(lambda spans: any(map(matches, spans)), timeout, what)
        return next(filter(matches, spans))

    def wait_for_exports(self, count=1, timeout=10.0, accepted=None) -> list[Export]:
        """Blocks until `count` export requests arrived (only accepted/rejected ones if given)."""
        __tracebackhide__ = True

        def chosen():
            return [e for e in self._exports if accepted is None or e.accepted == accepted]

        label = {None: "", True: " accepted", False: " rejected"}[accepted]
        self._wait(lambda: len(chosen()) >= count, self._exports, timeout, f"{count}{label} export request(s)")
        with self._cond:
            return chosen()

    def _wait(self, done, seen, timeout, what):
        __tracebackhide__ = True
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = done()
                if result:
                    return list(seen)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.dump()}")
                self._cond.wait(remaining)

    def dump(self, limit=50) -> str:
        """What was received, for a failure message."""
        with self._cond:
            exports, spans, problems = list(self._exports), list(self._spans), list(self._problems)
        accepted = sum(e.accepted for e in exports)
        lines = [
            f"{self.protocol} receiver at {self.endpoint}: {len(exports)} export request(s) "
            f"({accepted} accepted, {len(exports) - accepted} rejected), {len(spans)} span(s)"
        ]
        if len(spans) > limit:
            lines.append(f"  ... {len(spans) - limit} earlier span(s) left out")
        lines += [f"  {s}" for s in spans[-limit:]]
        lines += [f"  malformed request: {what}: {detail}" for what, detail in problems[-limit:]]
        return "\n".join(lines)

    # --- for the transports --------------------------------------------------------------

    def _record(self, request, headers):
        """Records one decoded export; returns the error to answer with, or None to accept."""
        spans = spans_of(request)
        with self._cond:
            fail = self._fail
            self._exports.append(Export(accepted=fail is False, spans=len(spans), headers=headers))
            if fail is False:
                self._spans.extend(spans)
            self._cond.notify_all()
        return None if fail is False else fail

    def _problem(self, what, detail):
        with self._cond:
            self._problems.append((what, detail))
            self._cond.notify_all()


_MISSING = object()


# --- OTLP/gRPC ---------------------------------------------------------------------------


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, rx):
        self.rx = rx

    def Export(self, request, context):
        headers = {k.lower(): v for k, v in context.invocation_metadata()}
        error = self.rx._record(request, headers)
        if error is not None:
            context.abort(error, "rejected by the test receiver")
        return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.contextmanager
def _grpc(rx):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp-grpc"))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(rx), server)
    rx.port = server.add_insecure_port("127.0.0.1:0")
    if not rx.port:
        raise RuntimeError("the OTLP/gRPC receiver could not bind 127.0.0.1")
    server.start()
    try:
        yield
    finally:
        server.stop(grace=None).wait()


# --- OTLP/HTTP protobuf ------------------------------------------------------------------


def _status_body(code, message):
    """A google.rpc.Status protobuf (code = 1, message = 2), as OTLP/HTTP error bodies are."""
    text = message.encode()
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text


def _varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# The gRPC code an OTLP/HTTP error status stands for, for the Status body.
_HTTP_TO_RPC = {400: 3, 401: 16, 403: 7, 404: 5, 408: 4, 413: 8, 415: 3, 429: 8, 500: 13, 501: 12, 503: 14, 504: 4}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as exporters expect
    server_version = "otlp-test-receiver"
    timeout = 30  # idle keep-alive connections are dropped after this

    def log_message(self, *args):
        pass

    def do_POST(self):
        rx = self.server.rx
        try:
            body = self._body()
        except (ValueError, OSError, zlib.error, EOFError) as e:
            rx._problem("unreadable body", repr(e))
            return self._reply(400, "application/x-protobuf", _status_body(3, f"unreadable body: {e}"), close=True)
        path = self.path.split("?", 1)[0]
        if path != TRACES_PATH:
            rx._problem(f"POST {self.path}", "not the traces path")
            return self._reply(404, "application/x-protobuf", _status_body(5, f"{path}: only {TRACES_PATH} here"))
        ctype = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype != "application/x-protobuf":
            rx._problem(f"Content-Type {ctype!r}", "only application/x-protobuf is served")
            return self._reply(415, "application/x-protobuf", _status_body(3, f"unsupported Content-Type {ctype!r}"))
        try:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        except DecodeError as e:
            rx._problem("undecodable ExportTraceServiceRequest", repr(e))
            return self._reply(400, "application/x-protobuf", _status_body(3, f"cannot decode: {e}"))
        error = rx._record(request, {k.lower(): v for k, v in self.headers.items()})
        if error is not None:
            return self._reply(error, "application/x-protobuf", _status_body(_HTTP_TO_RPC.get(error, 2), "rejected by the test receiver"))
        self._reply(200, "application/x-protobuf", trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

    def _body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
            body = bytes(body)
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
        if encoding != "identity":
            raise ValueError(f"unsupported Content-Encoding {encoding!r}")
        return body

    def _reply(self, status, ctype, body, close=False):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args):
        super().__init__(*args)
        self.connections = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request, client_address):
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self):
        """Closes kept-alive connections too, as a collector that goes away does."""
        with self.connections_lock:
            for sock in self.connections:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def _http(rx):
    server = _HTTPServer(("127.0.0.1", 0), _Handler)
    server.rx = rx
    rx.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="otlp-http", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.drop_connections()
        server.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def receiver(protocol="grpc", fail=False):
    """An OTLP trace receiver on 127.0.0.1 on a free port, serving until the block ends.

    protocol: "grpc" or "http/protobuf" (the values of OTEL_EXPORTER_OTLP_PROTOCOL).
    fail: False to accept exports; True to answer each with UNAVAILABLE (gRPC) / 503 (HTTP), or
    the error to answer with: a grpc.StatusCode or an HTTP status. `rx.fail` can be changed later.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: one of {PROTOCOLS}")
    rx = Receiver(protocol, fail)
    with (_grpc if protocol == "grpc" else _http)(rx):
        yield rx
