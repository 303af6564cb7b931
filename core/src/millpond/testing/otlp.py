"""A tiny OTLP/HTTP receiver for tests: real exporters in real processes send it their spans.

An in-memory exporter only sees spans of the test's own process; a worker subprocess or a prefork
child exports over the network like in production. This receiver is the other end of that wire:
a threaded HTTP server on 127.0.0.1 (a free port) that accepts `POST /v1/traces` in OTLP/HTTP
protobuf, gzip-compressed or not, decodes it and records every span in a flat, easy-to-assert
form. Point a process at it with `OTEL_EXPORTER_OTLP_ENDPOINT=<receiver.endpoint>`.

    with OtlpReceiver() as receiver:
        run_something(env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
        spans = receiver.wait_for(lambda spans: len(spans) >= 3, timeout=10)

`POST /v1/logs` and `/v1/metrics` are accepted and counted (not decoded), so a process exporting
everything does not log errors; anything else is a 404 that says what is served.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["OtlpReceiver", "ReceivedSpan", "any_value"]

TRACES_PATH = "/v1/traces"
OTHER_PATHS = ("/v1/logs", "/v1/metrics")
PROTOBUF = "application/x-protobuf"


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    """One span as an exporter sent it, with ids as lower-case hex ("" when absent)."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str  # INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER (or UNSPECIFIED)
    attributes: Mapping[str, Any]
    status_code: str  # UNSET, OK, ERROR
    status_message: str
    resource: Mapping[str, Any]
    scope: str
    start_ns: int
    end_ns: int
    events: tuple[str, ...] = ()
    links: tuple[tuple[str, str], ...] = ()  # (trace_id, span_id) of each link
    #: the receiver's monotonic clock when the request carrying it arrived
    received_at: float = field(default=0.0, compare=False)
    #: the User-Agent of that request: which exporter sent the span
    user_agent: str = field(default="", compare=False)

    @property
    def service_name(self) -> str | None:
        value = self.resource.get("service.name")
        return str(value) if value is not None else None

    @property
    def duration(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def any_value(value: Any) -> Any:
    """An OTLP `AnyValue` as the plain Python value it carries."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in pairs}


def _kind_name(kind: int) -> str:
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    return str(Span.SpanKind.Name(kind)).removeprefix("SPAN_KIND_")


def _status_name(code: int) -> str:
    from opentelemetry.proto.trace.v1.trace_pb2 import Status

    return str(Status.StatusCode.Name(code)).removeprefix("STATUS_CODE_")


def decode_traces(
    body: bytes, received_at: float = 0.0, user_agent: str = ""
) -> list[ReceivedSpan]:
    """Every span in a serialized `ExportTraceServiceRequest`."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope.name
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        kind=_kind_name(span.kind),
                        attributes=_attributes(span.attributes),
                        status_code=_status_name(span.status.code),
                        status_message=span.status.message,
                        resource=resource,
                        scope=scope,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        events=tuple(event.name for event in span.events),
                        links=tuple(
                            (link.trace_id.hex(), link.span_id.hex()) for link in span.links
                        ),
                        received_at=received_at,
                        user_agent=user_agent,
                    )
                )
    return spans


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as exporters expect

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if path not in (TRACES_PATH, *OTHER_PATHS):
            self._reply(
                HTTPStatus.NOT_FOUND,
                f"this test receiver serves POST {TRACES_PATH}, /v1/logs and /v1/metrics",
            )
            return
        encoding = (self.headers.get("Content-Encoding") or "").strip().lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            elif encoding not in ("", "identity"):
                raise ValueError(f"unsupported Content-Encoding {encoding!r}; use gzip or none")
        except (OSError, ValueError, zlib.error) as exc:
            self.server.receiver._reject(path, f"cannot decompress the body: {exc}")
            self._reply(HTTPStatus.BAD_REQUEST, f"cannot decompress the body: {exc}")
            return
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if content_type != PROTOBUF:
            message = (
                f"Content-Type {content_type!r} is not supported: this test receiver "
                f"decodes OTLP/HTTP protobuf ({PROTOBUF}) only"
            )
            self.server.receiver._reject(path, message)
            self._reply(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, message)
            return
        if path != TRACES_PATH:
            self.server.receiver._count(path)
            self._reply(HTTPStatus.OK, b"")
            return
        try:
            spans = decode_traces(body, time.monotonic(), self.headers.get("User-Agent") or "")
        except Exception as exc:  # a malformed body is the sender's bug: say so, keep serving
            self.server.receiver._reject(path, f"not an ExportTraceServiceRequest: {exc}")
            self._reply(HTTPStatus.BAD_REQUEST, f"not an ExportTraceServiceRequest: {exc}")
            return
        self.server.receiver._add(spans)
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceResponse,
        )

        self._reply(HTTPStatus.OK, ExportTraceServiceResponse().SerializeToString())

    def _reply(self, status: HTTPStatus, body: bytes | str) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", PROTOBUF if status == HTTPStatus.OK else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a test's output is no place for an access log."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver
        super().__init__(("127.0.0.1", 0), _Handler)


class OtlpReceiver:
    """An OTLP/HTTP collector stand-in on 127.0.0.1; `start()` (or `with`) and `stop()`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self.requests: dict[str, int] = {}
        self.rejected: list[tuple[str, str]] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> OtlpReceiver:
        if self._server is None:
            self._server = _Server(self)
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="otlp-receiver",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(5)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the OTLP receiver is not started: call start() or use `with`")
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        """The base URL for OTEL_EXPORTER_OTLP_ENDPOINT (exporters append /v1/traces)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def traces_endpoint(self) -> str:
        """The full URL for OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTLPSpanExporter(endpoint=)."""
        return f"{self.endpoint}{TRACES_PATH}"

    def env(self, service_name: str | None = None, **extra: str) -> dict[str, str]:
        """Environment variables that make an OpenTelemetry SDK process export here, quickly.

        `service_name` sets OTEL_SERVICE_NAME; `extra` adds or overrides variables.
        """
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }
        if service_name:
            env["OTEL_SERVICE_NAME"] = service_name
        env.update(extra)
        return env

    # -- what arrived --------------------------------------------------------------------------
    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._cond:
            return list(self._spans)

    def named(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.name == name]

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()
            self.requests.clear()
            self.rejected.clear()

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], Any], timeout: float, what: str = ""
    ) -> list[ReceivedSpan]:
        """Wait until `predicate(spans)` is true (re-checked on each export); returns the spans.

        Raises AssertionError after `timeout` seconds, with what arrived, so a failing test says
        which spans were missing.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                spans = list(self._spans)
                if predicate(spans):
                    return spans
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({s.name for s in spans})
                    raise AssertionError(
                        f"timed out after {timeout:g}s waiting for {what or 'spans'}: "
                        f"{len(spans)} spans arrived ({', '.join(names[:20]) or 'none'})"
                        + (f"; rejected requests: {self.rejected[:3]}" if self.rejected else "")
                    )
                self._cond.wait(left)

    #: the same wait, under the name the end-to-end tests use
    wait_for_spans = wait_for

    def __iter__(self) -> Iterator[ReceivedSpan]:
        return iter(self.spans)

    # -- called by the handler -----------------------------------------------------------------
    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._cond:
            self._spans.extend(spans)
            self.requests[TRACES_PATH] = self.requests.get(TRACES_PATH, 0) + 1
            self._cond.notify_all()

    def _count(self, path: str) -> None:
        with self._cond:
            self.requests[path] = self.requests.get(path, 0) + 1
            self._cond.notify_all()

    def _reject(self, path: str, reason: str) -> None:
        with self._cond:
            self.rejected.append((path, reason))
            self._cond.notify_all()
