"""The exporter's HTTP side: endpoint and header variables, gzip and deflate, retries, a failing
endpoint, TLS, forks and shutdown; and its selection by name through the SDK's entry points."""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from millpond.testing.otlp import OtlpReceiver
from millpond_otlp import USER_AGENT, OTLPSpanExporter

OTEL_VARIABLES = [
    f"OTEL_EXPORTER_OTLP_{signal}{name}"
    for signal in ("", "TRACES_")
    for name in (
        "ENDPOINT",
        "HEADERS",
        "COMPRESSION",
        "TIMEOUT",
        "CERTIFICATE",
        "CLIENT_CERTIFICATE",
        "CLIENT_KEY",
    )
]


@pytest.fixture(autouse=True)
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def spans() -> tuple[ReadableSpan, ...]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "exporter-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    for i in range(3):
        with tracer.start_as_current_span(f"span {i}", attributes={"i": i}):
            pass
    return exporter.get_finished_spans()


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Collector:
    """A scripted OTLP/HTTP endpoint: answers each POST with the next (status, headers) of
    `script` (200 once it runs out) and keeps what it was sent."""

    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    close_after_reply: bool = False
    seen: list[Seen] = field(default_factory=list)
    connections: set[int] = field(default_factory=set)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def collector() -> Iterator[Collector]:
    state = Collector()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state.connections.add(self.client_address[1])
            state.seen.append(
                Seen(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            )
            status, extra = state.script.pop(0) if state.script else (200, {})
            reply = b"" if status == 200 else b"collector says no: " + b"x" * 500
            self.send_response(status)
            for key, value in extra.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(reply)))
            if state.close_after_reply:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(reply)
            if state.close_after_reply:
                self.close_connection = True

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.server = server
    yield state
    server.shutdown()
    server.server_close()
    thread.join(5)


def _decoded(body: bytes) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString(body)


# -- configuration ----------------------------------------------------------------------------
def test_endpoint_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert OTLPSpanExporter().endpoint == "http://localhost:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    assert OTLPSpanExporter().endpoint == "http://collector:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://traces.example/custom")
    assert OTLPSpanExporter().endpoint == "https://traces.example/custom"  # as is, and wins
    assert OTLPSpanExporter(endpoint="http://arg:1/x").endpoint == "http://arg:1/x"
    with pytest.raises(ValueError, match="not an http:// or https:// URL"):
        OTLPSpanExporter(endpoint="grpc://collector:4317")


def test_timeout_and_compression_variables(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert OTLPSpanExporter().timeout == 10.0
    assert OTLPSpanExporter().compression == "none"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "3")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "deflate")
    assert OTLPSpanExporter().timeout == 3.0
    assert OTLPSpanExporter().compression == "deflate"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "0.5")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "GZIP")
    assert OTLPSpanExporter().timeout == 0.5
    assert OTLPSpanExporter().compression == "gzip"
    assert OTLPSpanExporter(timeout=7, compression="none").timeout == 7.0
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "soon")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "brotli")
    with caplog.at_level(logging.WARNING, logger="millpond_otlp"):
        exporter = OTLPSpanExporter()
    assert exporter.timeout == 10.0
    assert exporter.compression == "none"
    assert "Invalid timeout value 'soon'" in caplog.text
    assert "Unsupported compression type: brotli" in caplog.text


# -- what goes on the wire --------------------------------------------------------------------
def test_headers_reach_the_collector(
    collector: Collector, spans: tuple[ReadableSpan, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=general,x-tenant=acme")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "X-Api-Key=s3cret%20key,x-only=traces")
    exporter = OTLPSpanExporter(endpoint=f"{collector.url}/v1/traces", headers={"X-Arg": "1"})
    assert exporter.export(spans) == SpanExportResult.SUCCESS
    (seen,) = collector.seen
    assert seen.path == "/v1/traces"
    assert seen.headers["x-api-key"] == "s3cret key"  # _TRACES_ wins, URL-decoded
    assert "x-tenant" not in seen.headers  # the general variable is not merged in
    assert seen.headers["x-only"] == "traces"
    assert seen.headers["x-arg"] == "1"
    assert seen.headers["content-type"] == "application/x-protobuf"
    assert seen.headers["user-agent"] == USER_AGENT
    assert "content-encoding" not in seen.headers
    assert seen.body == encode_spans(spans).SerializePartialToString()
    exporter.shutdown()


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_compressed_requests(
    collector: Collector, spans: tuple[ReadableSpan, ...], compression: str
) -> None:
    exporter = OTLPSpanExporter(endpoint=f"{collector.url}/v1/traces", compression=compression)
    assert exporter.export(spans) == SpanExportResult.SUCCESS
    (seen,) = collector.seen
    assert seen.headers["content-encoding"] == compression
    raw = gzip.decompress(seen.body) if compression == "gzip" else zlib.decompress(seen.body)
    assert _decoded(raw) == encode_spans(spans)
    exporter.shutdown()


def test_gzip_to_the_test_receiver(spans: tuple[ReadableSpan, ...]) -> None:
    with OtlpReceiver() as receiver:
        exporter = OTLPSpanExporter(endpoint=receiver.traces_endpoint, compression="gzip")
        for _ in range(3):  # one kept-alive connection for all of them
            assert exporter.export(spans) == SpanExportResult.SUCCESS
        got = receiver.wait_for(lambda s: len(s) == 9, timeout=10, what="three exports")
        exporter.shutdown()
    assert not receiver.rejected
    assert [s.name for s in got[:3]] == ["span 0", "span 1", "span 2"]
    assert {s.user_agent for s in got} == {USER_AGENT}
    assert got[0].service_name == "exporter-test"


def test_one_connection_is_kept_alive(
    collector: Collector, spans: tuple[ReadableSpan, ...]
) -> None:
    exporter = OTLPSpanExporter(endpoint=f"{collector.url}/v1/traces")
    for _ in range(5):
        assert exporter.export(spans) == SpanExportResult.SUCCESS
    assert len(collector.seen) == 5
    assert len(collector.connections) == 1
    exporter.shutdown()


def test_a_collector_that_closes_each_connection(
    collector: Collector, spans: tuple[ReadableSpan, ...]
) -> None:
    collector.close_after_reply = True
    exporter = OTLPSpanExporter(endpoint=f"{collector.url}/v1/traces")
    for _ in range(3):
        assert exporter.export(spans) == SpanExportResult.SUCCESS
    assert len(collector.connections) == 3
    exporter.shutdown()


# -- failures ---------------------------------------------------------------------------------
def test_transient_errors_are_retried(
    collector: Collector, spans: tuple[ReadableSpan, ...], caplog: pytest.LogCaptureFixture
) -> None:
    collector.script = [(503, {}), (429, {"Retry-After": "0"}), (200, {})]
    exporter = OTLPSpanExporter(endpoint=f"{collector.url}/v1/traces", timeout=10)
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="millpond_otlp"):
        assert exporter.export(spans) == SpanExportResult.SUCCESS
    assert len(collector.seen) == 3
    assert time.monotonic() - began < 5  # ~1 s backoff, then Retry-After: 0
    assert "Transient error HTTP 503" in caplog.text
    exporter.shutdown()


def test_a_refused_batch_fails_at_once_with_one_clear_line(
    collector: Collector, spans: tuple[ReadableSpan, ...], caplog: pytest.LogCaptureFixture
) -> None:
    collector.script = [(400, {})]
    exporter = OTLPSpanExporter(endpoint=f"{collector.url}/v1/traces")
    with caplog.at_level(logging.WARNING, logger="millpond_otlp"):
        assert exporter.export(spans) == SpanExportResult.FAILURE
    assert len(collector.seen) == 1
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    message = record.getMessage()
    assert f"Failed to export 3 spans to {collector.url}/v1/traces: HTTP 400 Bad Request" in message
    assert "collector says no" in message
    assert "not retried; the spans are dropped" in message
    exporter.shutdown()


def test_an_endpoint_nobody_listens_on(
    spans: tuple[ReadableSpan, ...], caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: connections are refused
    exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces", timeout=2.5)
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="millpond_otlp"):
        assert exporter.export(spans) == SpanExportResult.FAILURE
    assert time.monotonic() - began < 4  # gives up within its timeout
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert f"Failed to export 3 spans to http://127.0.0.1:{port}/v1/traces" in message
    assert "ConnectionRefusedError" in message
    assert "the spans are dropped" in message
    exporter.shutdown()


def test_shutdown_interrupts_a_retry_and_refuses_more(
    collector: Collector, spans: tuple[ReadableSpan, ...], caplog: pytest.LogCaptureFixture
) -> None:
    collector.script = [(503, {"Retry-After": "30"})]
    exporter = OTLPSpanExporter(endpoint=f"{collector.url}/v1/traces", timeout=60)
    results: list[SpanExportResult] = []
    worker = threading.Thread(target=lambda: results.append(exporter.export(spans)))
    worker.start()
    deadline = time.monotonic() + 10
    while not collector.seen and time.monotonic() < deadline:
        time.sleep(0.01)
    began = time.monotonic()
    exporter.shutdown()
    worker.join(10)
    assert time.monotonic() - began < 5
    assert results == [SpanExportResult.FAILURE]
    with caplog.at_level(logging.WARNING, logger="millpond_otlp"):
        assert exporter.export(spans) == SpanExportResult.FAILURE
    assert "already shutdown" in caplog.text


def test_an_oversized_request_is_dropped(
    collector: Collector, spans: tuple[ReadableSpan, ...]
) -> None:
    exporter = OTLPSpanExporter(endpoint=f"{collector.url}/v1/traces", max_request_size=10)
    assert exporter.export(spans) == SpanExportResult.FAILURE
    assert collector.seen == []
    exporter.shutdown()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connection(
    collector: Collector, spans: tuple[ReadableSpan, ...]
) -> None:
    exporter = OTLPSpanExporter(endpoint=f"{collector.url}/v1/traces")
    assert exporter.export(spans) == SpanExportResult.SUCCESS
    pid = os.fork()
    if pid == 0:  # the child: export, then leave without running the parent's clean-up
        ok = exporter.export(spans) == SpanExportResult.SUCCESS
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert exporter.export(spans) == SpanExportResult.SUCCESS  # the parent's is still good
    assert len(collector.seen) == 3
    assert len(collector.connections) == 2
    exporter.shutdown()


# -- TLS --------------------------------------------------------------------------------------
@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    done = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        capture_output=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"openssl could not make a certificate: {done.stderr[-200:]!r}")
    return cert, key


def test_https_with_the_certificate_variable(
    certificate: tuple[Path, Path], spans: tuple[ReadableSpan, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    received: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}/v1/traces"
        untrusted = OTLPSpanExporter(endpoint=url, timeout=2)
        assert untrusted.export(spans) == SpanExportResult.FAILURE  # not in the system store
        untrusted.shutdown()
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(cert))
        trusted = OTLPSpanExporter(endpoint=url)
        assert trusted.export(spans) == SpanExportResult.SUCCESS
        trusted.shutdown()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert received == [encode_spans(spans).SerializePartialToString()]


# -- selection by name ------------------------------------------------------------------------
def test_registered_in_the_sdks_exporter_group() -> None:
    from importlib.metadata import entry_points

    (entry,) = entry_points(group="opentelemetry_traces_exporter", name="millpond_otlp")
    assert entry.load() is OTLPSpanExporter


def test_millpond_selects_it_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from millpond_tracing.otel import _registered_exporter

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    exporter = _registered_exporter("millpond_otlp")
    assert isinstance(exporter, OTLPSpanExporter)
    assert exporter.endpoint == "http://collector:4318/v1/traces"
