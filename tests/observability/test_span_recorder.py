"""millpond's span recorder: the wire format, the Span API, sampling, batching, fork and transport.

The bytes are checked by the official generated protobuf classes (the receiver decodes them the
way a collector does), the sampler against the SDK's own samplers, and the transport against a
real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import gzip
import os
import random
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.trace import SpanKind, Status, StatusCode

from millpond import otlp_wire
from millpond.exceptions import ConfigurationError
from millpond.observability import SAMPLERS
from millpond.otlp_http import OtlpHttpSender, endpoint
from millpond.span_recorder import (
    RecordedSpan,
    SpanRecorder,
    new_span_hex,
    new_trace_hex,
    parse_traceparent,
    sampler_from_env,
)
from millpond.testing.otlp import OtlpReceiver, any_value

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


class Capture:
    """A `send` that keeps every request instead of posting it."""

    def __init__(self, ok: bool = True) -> None:
        self.requests: list[bytes] = []
        self.ok = ok
        self.sent = threading.Event()

    def __call__(self, data: bytes, timeout: float) -> bool:
        self.requests.append(data)
        self.sent.set()
        return self.ok

    def spans(self) -> list[Any]:
        out = []
        for data in self.requests:
            request = ExportTraceServiceRequest()
            request.ParseFromString(data)
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    out.extend(scope_spans.spans)
        return out


def make_recorder(send: Any, **options: Any) -> SpanRecorder:
    options.setdefault("delay", 60.0)
    return SpanRecorder(
        send,
        {"service.name": "svc", "host.cores": 2, "deployment.ok": True},
        "9.9",
        sampler=options.pop("sampler", lambda parent, trace_hex: True),
        **options,
    )


def span(recorder: SpanRecorder | None, **kw: Any) -> RecordedSpan:
    return RecordedSpan(
        recorder,
        kw.pop("trace_hex", TRACE),
        kw.pop("parent_hex", PARENT),
        kw.pop("name", "process q"),
        kw.pop("kind", otlp_wire.KIND_CONSUMER),
        kw.pop("base", otlp_wire.span_attributes({"messaging.destination.name": "q"})),
        kw.pop("message", ("task-1", 2, 3, None)),
        **kw,
    )


def attrs(pairs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in pairs}


@pytest.fixture
def capture() -> Capture:
    return Capture()


@pytest.fixture
def recorder(capture: Capture) -> Iterator[SpanRecorder]:
    rec = make_recorder(capture)
    yield rec
    rec.shutdown()


# -- the wire ---------------------------------------------------------------------------------------
def test_a_span_with_everything_decodes_with_the_official_classes(
    recorder: SpanRecorder, capture: Capture
) -> None:
    state = trace.TraceState([("vendor", "value")])
    s = span(
        recorder,
        parent_remote=True,
        trace_state=state,
        link_from=(TRACE, PARENT, "vendor=value"),
        message=("task-1", 2, 3, 1.0),
    )
    s.set_attribute("text", "héllo")
    s.set_attribute("flag", True)
    s.set_attribute("negative", -5)
    s.set_attribute("big", 2**62)
    s.set_attribute("ratio", 0.25)
    s.set_attribute("words", ["a", "b"])
    s.set_attribute("numbers", [1, 2, 3])
    s.set_attribute("ignored", None)  # type: ignore[arg-type]
    s.add_event("retry", {"millpond.retry.countdown": 1.5}, timestamp=123)
    s.add_link(trace.SpanContext(int(TRACE, 16), 7, is_remote=False), {"why": "fan-in"})
    s.state = "FAILURE"
    s.set_status(Status(StatusCode.ERROR, "ValueError: boom"))
    s.end()
    assert recorder.force_flush()

    request = ExportTraceServiceRequest()
    request.ParseFromString(capture.requests[0])
    (resource_spans,) = request.resource_spans
    assert attrs(resource_spans.resource.attributes) == {
        "service.name": "svc",
        "host.cores": 2,
        "deployment.ok": True,
    }
    (scope_spans,) = resource_spans.scope_spans
    assert (scope_spans.scope.name, scope_spans.scope.version) == ("millpond", "9.9")
    (got,) = scope_spans.spans
    assert got.trace_id.hex() == TRACE
    assert got.span_id.hex() == s.span_hex
    assert got.parent_span_id.hex() == PARENT
    assert got.trace_state == "vendor=value"
    assert got.name == "process q"
    assert got.kind == 5  # CONSUMER
    assert got.start_time_unix_nano == s.start_ns < got.end_time_unix_nano == s.end_ns
    assert got.flags == 0x300  # is_remote known, and remote
    values = attrs(got.attributes)
    queue_wait = values.pop("millpond.task.queue_wait_ms")
    assert queue_wait == pytest.approx(s.start_ns / 1e6 - 1000.0)
    assert values == {
        "messaging.destination.name": "q",
        "messaging.message.id": "task-1",
        "millpond.task.retries": 2,
        "millpond.message.delivery_count": 3,
        "millpond.task.state": "FAILURE",
        "text": "héllo",
        "flag": True,
        "negative": -5,
        "big": 2**62,
        "ratio": 0.25,
        "words": ["a", "b"],
        "numbers": [1, 2, 3],
    }
    (event,) = got.events
    assert (event.name, event.time_unix_nano) == ("retry", 123)
    assert attrs(event.attributes) == {"millpond.retry.countdown": 1.5}
    producer_link, added_link = got.links
    assert (producer_link.trace_id.hex(), producer_link.span_id.hex()) == (TRACE, PARENT)
    assert producer_link.trace_state == "vendor=value"
    assert producer_link.flags == 0x300
    assert added_link.span_id.hex() == f"{7:016x}"
    assert added_link.flags == 0x100  # known, and local
    assert attrs(added_link.attributes) == {"why": "fan-in"}
    assert (got.status.code, got.status.message) == (2, "ValueError: boom")


def test_a_root_span_has_no_parent_and_local_flags(
    recorder: SpanRecorder, capture: Capture
) -> None:
    s = span(recorder, parent_hex="", kind=otlp_wire.KIND_INTERNAL, message=None)
    s.end()
    recorder.force_flush()
    (got,) = capture.spans()
    assert got.parent_span_id == b""
    assert got.flags == 0x100
    assert got.kind == 1
    assert not got.HasField("status")


def test_long_values_and_many_spans_round_trip(recorder: SpanRecorder, capture: Capture) -> None:
    """Lengths past one varint byte, and a request past 64 KiB."""
    text = "x" * 70_000
    for index in range(300):
        s = span(recorder, message=(f"task-{index}", index, 1, None))
        s.set_attribute("payload", text if index == 0 else "y" * 200)
        s.end()
    recorder.force_flush()
    got = capture.spans()
    assert len(got) == 300
    assert attrs(got[0].attributes)["payload"] == text
    assert [attrs(g.attributes)["millpond.task.retries"] for g in got] == list(range(300))


@pytest.mark.parametrize("parent_hex", [PARENT, ""])
@pytest.mark.parametrize("parent_remote", [True, False])
@pytest.mark.parametrize("link", [True, False])
@pytest.mark.parametrize("sent_at", [None, 1.0, 4e9])  # 4e9: sent "in the future", a wait of 0
@pytest.mark.parametrize("state", [None, "SUCCESS", "RETRY"])
def test_plain_spans_encode_exactly_like_the_general_encoder(
    recorder: SpanRecorder,
    parent_hex: str,
    parent_remote: bool,
    link: bool,
    sent_at: float | None,
    state: str | None,
) -> None:
    """The one-struct encoding of spans nothing was added to is the general encoding's bytes."""
    for task_id, retries, delivery_count, name in [
        ("3f1d6c8e-5b7a-4e2f-9c1d-0a2b4c6d8e0f", 0, 1, "run tasks.add"),
        ("", 2, 0, "process q"),
        ("täsk-" + "x" * 200, 300, 7, "p" * 200),  # multi-byte text, lengths past one byte
    ]:
        s = span(
            recorder,
            parent_hex=parent_hex,
            parent_remote=parent_remote,
            name=name,
            message=(task_id, retries, delivery_count, sent_at),
            link_from=(TRACE, PARENT, None) if link else None,
        )
        s.state = state
        s.end_ns = s.start_ns + 12_345
        plain = s.encode()
        s.plain = False  # what any added attribute, event, link or status does
        assert plain == s.encode()
        request = ExportTraceServiceRequest()
        request.ParseFromString(otlp_wire.request(b"", b"", [plain]))
        (got,) = request.resource_spans[0].scope_spans[0].spans
        assert attrs(got.attributes)["messaging.message.id"] == task_id
        assert got.end_time_unix_nano - got.start_time_unix_nano == 12_345


def test_adding_to_a_span_leaves_the_plain_encoding(recorder: SpanRecorder) -> None:
    for change in (
        lambda s: s.set_attribute("k", "v"),
        lambda s: s.add_event("e"),
        lambda s: s.add_link(trace.SpanContext(int(TRACE, 16), 7, is_remote=False)),
        lambda s: s.set_status(StatusCode.ERROR),
        lambda s: s.record_exception(ValueError("boom")),
    ):
        s = span(recorder)
        assert s.plain
        change(s)
        assert not s.plain


# -- the Span API -----------------------------------------------------------------------------------
def test_span_context_and_recording(recorder: SpanRecorder) -> None:
    s = span(recorder)
    ctx = s.get_span_context()
    assert (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}") == (TRACE, s.span_hex)
    assert ctx.trace_flags.sampled and not ctx.is_remote and ctx.is_valid
    assert s.is_recording()
    assert s.traceparent == f"00-{TRACE}-{s.span_hex}-01"
    s.end()
    assert not s.is_recording()
    s.end()  # a second end records nothing more
    assert len(recorder._queue) == 1


def test_an_unsampled_span_carries_context_and_records_nothing() -> None:
    s = span(None)
    s.set_attribute("a", 1)
    s.add_event("e")
    s.set_status(StatusCode.ERROR)
    s.record_exception(ValueError("x"))
    s.end()
    assert not s.is_recording()
    assert not s.get_span_context().trace_flags.sampled
    assert s.traceparent.endswith("-00")
    assert s.attributes is None and s.events is None and s.status_code == 0


def test_status_rules_follow_the_api(recorder: SpanRecorder) -> None:
    s = span(recorder)
    s.set_status(StatusCode.UNSET)
    assert s.status_code == 0
    s.set_status(StatusCode.ERROR, "first")
    assert (s.status_code, s.status_message) == (2, "first")
    s.set_status(StatusCode.OK, "ignored for OK")
    assert (s.status_code, s.status_message) == (1, None)
    s.set_status(StatusCode.ERROR, "too late")  # OK is final
    assert s.status_code == 1


def test_record_exception_is_an_event_like_the_sdk(
    recorder: SpanRecorder, capture: Capture
) -> None:
    try:
        raise KeyError("missing")
    except KeyError as exc:
        s = span(recorder)
        s.record_exception(exc, {"extra": 1}, escaped=True)
    s.end()
    recorder.force_flush()
    (event,) = capture.spans()[0].events
    values = attrs(event.attributes)
    assert event.name == "exception"
    assert values["exception.type"] == "KeyError"
    assert values["exception.message"] == "'missing'"
    assert "raise KeyError" in values["exception.stacktrace"]
    assert values["exception.escaped"] == "True"
    assert values["extra"] == 1


def test_limits_drop_and_count(capture: Capture) -> None:
    rec = make_recorder(capture, max_attributes=2, max_events=1, max_attribute_length=3)
    try:
        s = span(rec)
        s.set_attributes({"a": "abcdef", "b": ["xyzw", 1]})
        s.set_attribute("c", 1)  # over the limit: dropped
        s.set_attribute("a", "zz")  # an existing key may still change
        s.add_event("one")
        s.add_event("two")  # dropped
        s.end()
        rec.force_flush()
        (got,) = capture.spans()
        values = attrs(got.attributes)
        assert values["a"] == "zz" and values["b"] == ["xyz", 1] and "c" not in values
        assert got.dropped_attributes_count == 1
        assert [e.name for e in got.events] == ["one"]
        assert got.dropped_events_count == 1
    finally:
        rec.shutdown()


def test_ids_are_valid_hex() -> None:
    for _ in range(1000):
        trace_hex, span_hex = new_trace_hex(), new_span_hex()
        assert len(trace_hex) == 32 and int(trace_hex, 16)
        assert len(span_hex) == 16 and int(span_hex, 16)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"00-{TRACE}-{PARENT}-01", (TRACE, PARENT, True)),
        (f"00-{TRACE}-{PARENT}-00", (TRACE, PARENT, False)),
        (f"00-{TRACE}-{PARENT}-03", (TRACE, PARENT, True)),
        (f"00-{TRACE}-{PARENT}-02", (TRACE, PARENT, False)),
        (f"00-{'0' * 32}-{PARENT}-01", None),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"00-{TRACE.upper()}-{PARENT}-01", None),
        (f"00-{TRACE}-{PARENT}-01-extra", None),
        (f"00-{TRACE[:-1]} -{PARENT}-01", None),
        ("", None),
        ("garbage", None),
    ],
)
def test_parse_traceparent(header: str, expected: Any) -> None:
    assert parse_traceparent(header) == expected


# -- sampling ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*SAMPLERS, ""])
def test_sampling_decides_like_the_sdk(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.trace import sampling

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", name)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.3")
    sdk = sampling._get_from_env_or_default()
    ours = sampler_from_env()
    rng = random.Random(7)
    for _ in range(3000):
        trace_id = rng.getrandbits(128) or 1
        parent: bool | None = rng.choice([None, True, False])
        context = None
        if parent is not None:
            flags = trace.TraceFlags(trace.TraceFlags.SAMPLED if parent else 0)
            remote = trace.SpanContext(trace_id, 1, is_remote=True, trace_flags=flags)
            context = trace.set_span_in_context(trace.NonRecordingSpan(remote))
        decision = sdk.should_sample(context, trace_id, "process q", SpanKind.CONSUMER)
        assert ours(parent, f"{trace_id:032x}") == decision.decision.is_sampled(), (
            name,
            parent,
        )


# -- batching, flushing, fork -----------------------------------------------------------------------
def test_a_full_batch_is_exported_without_waiting_for_the_delay(capture: Capture) -> None:
    rec = make_recorder(capture, batch_size=10, delay=60.0)
    try:
        for _ in range(10):
            span(rec).end()
        assert capture.sent.wait(10), "a full batch should wake the export thread"
        assert len(capture.spans()) == 10
    finally:
        rec.shutdown()


def test_a_full_queue_drops_counts_and_says_so(capture: Capture) -> None:
    messages: list[str] = []
    rec = make_recorder(capture, max_queue=5, batch_size=100, on_error=messages.append)
    try:
        rec._thread = threading.current_thread()  # hold the export thread off: fill the queue
        for _ in range(8):
            span(rec).end()
        assert rec.dropped == 3
        assert len(messages) == 1 and "OTEL_BSP_MAX_QUEUE_SIZE" in messages[0]
        assert rec.force_flush()
        assert len(capture.spans()) == 5
    finally:
        rec._thread = None
        rec.shutdown()


def test_a_transport_that_raises_does_not_stop_the_export_thread() -> None:
    messages: list[str] = []
    calls: list[int] = []

    def flaky(data: bytes, timeout: float) -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("transport bug")
        return True

    rec = make_recorder(flaky, batch_size=1, on_error=messages.append)
    try:
        span(rec).end()
        span(rec).end()
        rec.force_flush()
        assert rec.failed == 1 and rec.exported == 1
        assert messages[0] == "export failed: RuntimeError: transport bug"
    finally:
        rec.shutdown()


def test_failed_exports_are_counted_and_reported() -> None:
    messages: list[str] = []
    capture = Capture(ok=False)
    rec = make_recorder(capture, on_error=messages.append)
    try:
        span(rec).end()
        assert not rec.force_flush()
        assert rec.failed == 1 and rec.exported == 0
        assert messages == ["could not export 1 spans"]
    finally:
        rec.shutdown()


def test_shutdown_exports_what_is_left_and_stops(capture: Capture) -> None:
    rec = make_recorder(capture)
    for _ in range(3):
        span(rec).end()
    thread = rec._thread
    rec.shutdown()
    assert len(capture.spans()) == 3
    assert thread is not None and not thread.is_alive()
    span(rec).end()  # after shutdown: queued, never exported by a thread
    assert rec._thread is None or not rec._thread.is_alive()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_exports_only_its_own_spans() -> None:
    with OtlpReceiver() as receiver:
        rec = make_recorder(_post_to(receiver.traces_endpoint))
        try:
            parent_span = span(rec, name="in the parent")
            parent_span.end()  # queued in the parent, not exported yet
            pid = os.fork()
            if pid == 0:  # the child: its queue starts empty, its own thread exports
                code = 0
                try:
                    span(rec, name="in the child").end()
                    code = 0 if rec.force_flush(10_000) else 3
                except BaseException:
                    code = 4
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert rec.force_flush(10_000)
            spans = receiver.wait_for(lambda got: len(got) >= 2, timeout=10, what="two spans")
            assert sorted(s.name for s in spans) == ["in the child", "in the parent"]
        finally:
            rec.shutdown()


def _post_to(url: str) -> Any:
    import requests

    session = requests.Session()

    def send(data: bytes, timeout: float) -> bool:
        response = session.post(
            url, data=data, timeout=timeout, headers={"Content-Type": "application/x-protobuf"}
        )
        return response.ok

    return send


# -- the transport ----------------------------------------------------------------------------------
class Scripted:
    """An HTTP(S) server answering POSTs with scripted statuses; keeps what it got.

    `close_idle` closes each connection after answering without saying so (a collector's idle
    timeout, as a keep-alive client finds it); `tls` serves HTTPS.
    """

    def __init__(
        self,
        statuses: list[int],
        *,
        close_idle: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.connections: set[tuple[str, int]] = set()
        self.client_certs: list[Any] = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                scripted.requests.append((self.path, dict(self.headers), body))
                scripted.connections.add(self.client_address)
                if tls is not None:
                    scripted.client_certs.append(self.connection.getpeercert())
                status = scripted.statuses.pop(0) if scripted.statuses else 200
                self.send_response(status)
                if status == HTTPStatus.TOO_MANY_REQUESTS:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()
                if close_idle:
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ConnectProxy:
    """An HTTP proxy that only tunnels (CONNECT), as an https:// collector is reached through one."""

    def __init__(self) -> None:
        self.tunnels: list[tuple[str, str | None]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_CONNECT(self) -> None:
                proxy.tunnels.append((self.path, self.headers.get("Proxy-Authorization")))
                port = self.path.rsplit(":", 1)[1]
                with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as upstream:
                    self.send_response(200, "Connection established")
                    self.end_headers()
                    ends = [self.connection, upstream]
                    while True:
                        readable, _, _ = select.select(ends, [], [], 10)
                        if not readable:
                            return
                        for end in readable:
                            data = end.recv(65536)
                            if not data:
                                return
                            (upstream if end is self.connection else self.connection).sendall(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def clean_otlp_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("OTEL_EXPORTER_OTLP") or name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the sender waits to retry: what it tests must succeed at once."""

    def sleep(seconds: float) -> None:
        raise AssertionError(f"the sender backed off {seconds:.2f} s")

    monkeypatch.setattr("millpond.otlp_http.time.sleep", sleep)


@pytest.fixture
def collector() -> Iterator[Scripted]:
    """A collector that accepts every request."""
    server = Scripted([])
    yield server
    server.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from tests.brokers.test_redis import make_certs

    return make_certs(tmp_path_factory.mktemp("otlp-certs"))


def test_endpoint_resolution(clean_otlp_env: pytest.MonkeyPatch) -> None:
    assert endpoint() == "http://localhost:4318/v1/traces"
    clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    assert endpoint() == "http://collector:4318/v1/traces"
    clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://other:9/custom")
    assert endpoint() == "http://other:9/custom"  # the signal's own endpoint is used as given


def test_transient_failures_are_retried(clean_otlp_env: pytest.MonkeyPatch) -> None:
    server = Scripted([503, 429])
    try:
        clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", server.url)
        clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=s%20ecret,tenant=a")
        sender = OtlpHttpSender()
        assert sender.send(b"payload", timeout=20)
        assert len(server.requests) == 3
        path, headers, body = server.requests[-1]
        assert path == "/v1/traces" and body == b"payload"
        assert headers["x-api-key"] == "s ecret" and headers["tenant"] == "a"
        assert headers["Content-Type"] == "application/x-protobuf"
        assert headers["User-Agent"].startswith("millpond-span-recorder/")
        sender.close()
    finally:
        server.close()


def test_a_rejected_request_is_not_retried(clean_otlp_env: pytest.MonkeyPatch) -> None:
    server = Scripted([400])
    try:
        clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{server.url}/v1/traces")
        sender = OtlpHttpSender()
        assert not sender.send(b"payload", timeout=20)
        assert len(server.requests) == 1
        assert sender.last_error is not None and "HTTP 400" in sender.last_error
    finally:
        server.close()


def test_gzip_compression(clean_otlp_env: pytest.MonkeyPatch, collector: Scripted) -> None:
    clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
    clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
    assert OtlpHttpSender().send(b"payload" * 100, timeout=20)
    _, headers, body = collector.requests[0]
    assert headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == b"payload" * 100


def test_an_unreachable_collector_fails_within_the_timeout(
    clean_otlp_env: pytest.MonkeyPatch,
) -> None:
    import socket
    import time

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    sender = OtlpHttpSender()
    started = time.monotonic()
    assert not sender.send(b"payload", timeout=1.5)
    assert time.monotonic() - started < 10
    assert sender.last_error is not None and "cannot reach" in sender.last_error


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "brotli", "gzip"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon", "seconds"),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "-1", "seconds"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4318", "http:// or https://"),
    ],
)
def test_bad_transport_settings_are_refused(
    clean_otlp_env: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    clean_otlp_env.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=message):
        OtlpHttpSender()


def test_one_connection_carries_every_request(
    clean_otlp_env: pytest.MonkeyPatch, no_backoff: None, collector: Scripted
) -> None:
    clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
    sender = OtlpHttpSender()
    for n in range(5):
        assert sender.send(f"batch {n}".encode(), timeout=20)
    assert [body for _, _, body in collector.requests] == [f"batch {n}".encode() for n in range(5)]
    assert len(collector.connections) == 1
    sender.close()


def test_a_connection_the_collector_closed_while_idle_is_replaced_at_once(
    clean_otlp_env: pytest.MonkeyPatch, no_backoff: None
) -> None:
    server = Scripted([], close_idle=True)
    try:
        clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", server.url)
        sender = OtlpHttpSender()
        for n in range(3):
            assert sender.send(f"batch {n}".encode(), timeout=20), sender.last_error
        assert len(server.requests) == 3 and len(server.connections) == 3
    finally:
        server.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connection(
    clean_otlp_env: pytest.MonkeyPatch, no_backoff: None, collector: Scripted
) -> None:
    clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
    sender = OtlpHttpSender()
    assert sender.send(b"parent 1", timeout=20)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0 if sender.send(b"child", timeout=20) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert sender.send(b"parent 2", timeout=20)
    assert [body for _, _, body in collector.requests] == [b"parent 1", b"child", b"parent 2"]
    assert len(collector.connections) == 2  # the parent kept its own connection


def _tls_server(certs: tuple[Path, Path, Path], *, client_cert: bool = False) -> Scripted:
    ca, cert, key = certs
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(ca)
    return Scripted([], tls=context)


def test_https_with_a_private_ca_and_a_client_certificate(
    clean_otlp_env: pytest.MonkeyPatch, certs: tuple[Path, Path, Path], no_backoff: None
) -> None:
    ca, cert, key = certs
    server = _tls_server(certs, client_cert=True)
    try:
        clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"https://localhost:{server.port}")
        clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(ca))
        clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", str(cert))
        clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", str(key))
        sender = OtlpHttpSender()
        assert sender.send(b"secret spans", timeout=20), sender.last_error
        assert [body for _, _, body in server.requests] == [b"secret spans"]
        assert server.client_certs[0]  # the server saw (and verified) the client's certificate
    finally:
        server.close()


def test_an_untrusted_collector_certificate_fails_without_retrying(
    clean_otlp_env: pytest.MonkeyPatch, certs: tuple[Path, Path, Path], no_backoff: None
) -> None:
    server = _tls_server(certs)
    try:
        clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"https://localhost:{server.port}")
        sender = OtlpHttpSender()  # the system's CAs only: the private CA is unknown
        assert not sender.send(b"spans", timeout=20)
        assert sender.last_error is not None and "CERTIFICATE_VERIFY_FAILED" in sender.last_error
        assert server.requests == []
    finally:
        server.close()


def test_missing_tls_files_are_refused_at_start(clean_otlp_env: pytest.MonkeyPatch) -> None:
    clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://localhost:4318")
    clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.crt")
    with pytest.raises(ConfigurationError, match="OTEL_EXPORTER_OTLP_CERTIFICATE"):
        OtlpHttpSender()


def test_an_http_proxy_gets_the_whole_url_and_the_credentials(
    clean_otlp_env: pytest.MonkeyPatch, no_backoff: None, collector: Scripted
) -> None:
    proxy = collector  # an HTTP proxy is asked the same way a collector is, with the whole URL
    clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector.invalid:4318")
    clean_otlp_env.setenv("HTTP_PROXY", f"http://user:p%40ss@127.0.0.1:{proxy.port}")
    sender = OtlpHttpSender()
    assert sender.send(b"spans", timeout=20), sender.last_error
    path, headers, body = proxy.requests[0]
    assert path == "http://collector.invalid:4318/v1/traces" and body == b"spans"
    assert headers["Proxy-Authorization"] == "Basic dXNlcjpwQHNz"  # user:p@ss
    clean_otlp_env.setenv("NO_PROXY", "collector.invalid")
    assert OtlpHttpSender()._proxy is None  # bypassed: straight to the collector


def test_an_https_collector_is_reached_through_a_proxy_tunnel(
    clean_otlp_env: pytest.MonkeyPatch, certs: tuple[Path, Path, Path], no_backoff: None
) -> None:
    server = _tls_server(certs)
    proxy = ConnectProxy()
    try:
        clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"https://localhost:{server.port}")
        clean_otlp_env.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(certs[0]))
        clean_otlp_env.setenv("HTTPS_PROXY", proxy.url.replace("http://", "http://u:pw@"))
        sender = OtlpHttpSender()
        assert sender.send(b"tunnelled", timeout=20), sender.last_error
        assert sender.send(b"again", timeout=20), sender.last_error
        assert [body for _, _, body in server.requests] == [b"tunnelled", b"again"]
        assert proxy.tunnels == [(f"localhost:{server.port}", "Basic dTpwdw==")]  # one tunnel
    finally:
        proxy.close()
        server.close()


# -- in a worker ------------------------------------------------------------------------------------
@pytest.fixture
def recorded(span_exporter: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Capture]:
    """The worker's spans through a recorder (captured), user spans through the session's SDK."""
    from millpond import telemetry

    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    capture = Capture()
    rec = make_recorder(capture, sampler=sampler_from_env())
    telemetry.use_recorder(rec)
    try:
        yield capture
    finally:
        telemetry.use_recorder(None)
        rec.shutdown()


@pytest.fixture
def traced_app() -> Iterator[Any]:
    from millpond import Millpond
    from tests.conftest import unique

    name = unique("rec")
    application = Millpond("rec", broker_url=f"memory://{name}", default_queue=name, queues=[name])
    tracer = trace.get_tracer("user-code")
    application.seen_log_context = {}  # type: ignore[attr-defined]

    @application.task(name="rec.inner")
    def inner(x: int) -> int:
        import structlog

        application.seen_log_context[x] = structlog.contextvars.get_contextvars()  # type: ignore[attr-defined]
        with tracer.start_as_current_span("inner work") as own:
            own.set_attribute("x", x)
        trace.get_current_span().set_attribute("user.note", "set on run")
        return x

    @application.task(name="rec.broken")
    def broken() -> None:
        raise KeyError("missing-thing")

    yield application
    application.close()


def _by_task(capture: Capture, task_id: str) -> list[Any]:
    return [
        s for s in capture.spans() if attrs(s.attributes).get("messaging.message.id") == task_id
    ]


def test_user_spans_continue_from_the_recorded_run_span(
    traced_app: Any, start_worker: Any, span_exporter: Any, recorded: Capture
) -> None:
    from millpond import telemetry
    from millpond.protocol import encode_task

    start_worker(traced_app, pool="threads", concurrency=2)
    queue = traced_app.settings.default_queue
    sampled = encode_task("rec.inner", (7,), {})
    sampled.headers["traceparent"] = f"00-{TRACE}-{PARENT}-01"
    sampled.headers["tracestate"] = "vendor=abc"
    unsampled = encode_task("rec.inner", (8,), {})
    unsampled.headers["traceparent"] = f"00-{'1' * 32}-{PARENT}-00"
    broken = encode_task("rec.broken", (), {})
    for message in (sampled, unsampled, broken):
        traced_app.broker.publish(queue, message)
    assert traced_app.AsyncResult(sampled.headers["id"]).get(timeout=10) == 7
    assert traced_app.AsyncResult(unsampled.headers["id"]).get(timeout=10) == 8
    with pytest.raises(KeyError):
        traced_app.AsyncResult(broken.headers["id"]).get(timeout=10)
    recorder = telemetry.recorder()
    assert recorder is not None

    def both(task_id: str) -> list[Any]:
        import time

        deadline = time.monotonic() + 10  # the process span ends just after the result is stored
        while time.monotonic() < deadline:
            recorder.force_flush()
            found = _by_task(recorded, task_id)
            if len(found) == 2:
                return found
            time.sleep(0.01)
        raise AssertionError(f"no process and run span for {task_id}")

    spans = {s.name: s for s in both(sampled.headers["id"])}
    process, run = spans[f"process {queue}"], spans["run rec.inner"]
    assert process.trace_id.hex() == run.trace_id.hex() == TRACE
    assert process.parent_span_id.hex() == PARENT
    assert run.parent_span_id == process.span_id
    assert process.trace_state == run.trace_state == "vendor=abc"
    assert attrs(process.attributes)["millpond.pool"] == "threads"
    assert attrs(process.attributes)["millpond.task.state"] == "SUCCESS"
    assert attrs(run.attributes)["user.note"] == "set on run"
    (user,) = [
        s
        for s in span_exporter.get_finished_spans()
        if s.name == "inner work" and f"{s.context.trace_id:032x}" == TRACE
    ]
    assert user.parent.span_id == int.from_bytes(run.span_id, "big")
    assert user.context.trace_state.get("vendor") == "abc"
    log_context = traced_app.seen_log_context[7]
    assert (log_context["trace_id"], log_context["span_id"]) == (TRACE, run.span_id.hex())

    # the producer sampled it out: nothing recorded, and the user's span follows that decision
    assert not _by_task(recorded, unsampled.headers["id"])
    assert not [
        s for s in span_exporter.get_finished_spans() if f"{s.context.trace_id:032x}" == "1" * 32
    ]

    # a failure: no producer context, a fresh sampled trace; both spans are errors
    spans = {s.name: s for s in both(broken.headers["id"])}
    process, run = spans[f"process {queue}"], spans["run rec.broken"]
    assert process.parent_span_id == b""
    assert (process.status.code, run.status.code) == (2, 2)
    assert attrs(process.attributes)["error.type"] == "KeyError"
    (event,) = run.events
    assert event.name == "exception"
    assert attrs(event.attributes)["exception.type"] == "KeyError"


def _started_job(task_id: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A job whose `process` span the pool has opened, as `BasePool.apply_async` does."""
    from millpond import telemetry
    from millpond.pool import Job

    monkeypatch.setattr(telemetry, "TRACING", True)
    job = Job(
        task_id=task_id,
        task_name="rec.direct",
        args=(),
        kwargs={},
        queue="q",
        producer_traceparent=f"00-{TRACE}-{PARENT}-01",
    )
    telemetry.start_process_span(job, "solo")
    return job


def _ended(job: Any, state: str, recorded: Capture) -> dict[str, Any]:
    """End the job's `process` span, export, and return its two spans by name."""
    from millpond import telemetry
    from millpond.pool import Outcome

    telemetry.end_process_span(job, Outcome(state=state))
    recorder = telemetry.recorder()
    assert recorder is not None and recorder.force_flush()
    return {s.name: s for s in _by_task(recorded, job.task_id)}


def test_in_a_fresh_context_the_run_span_stays_current_and_records_what_escapes(
    recorded: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the execution unit does: no way back is kept, the context is thrown away anyway."""
    import contextvars

    from millpond import telemetry

    job = _started_job("fresh-1", monkeypatch)
    seen: list[Any] = []

    def execution_unit() -> None:
        with telemetry.run_span(job, fresh_context=True) as span:
            seen.append((span, trace.get_current_span()))
            raise KeyboardInterrupt  # escapes the task's own handling

    with pytest.raises(KeyboardInterrupt):
        contextvars.Context().run(execution_unit)
    ((span, current),) = seen
    assert isinstance(span, RecordedSpan) and current is span
    assert not trace.get_current_span().get_span_context().is_valid  # the caller's is untouched
    spans = _ended(job, "LOST", recorded)
    run = spans["run rec.direct"]
    assert run.parent_span_id == spans["process q"].span_id
    assert run.status.code == 2
    (event,) = run.events
    assert attrs(event.attributes)["exception.escaped"] == "True"


def test_otherwise_the_run_span_gives_the_context_back(
    recorded: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from millpond import telemetry

    job = _started_job("kept-1", monkeypatch)
    with telemetry.run_span(job) as span:
        assert trace.get_current_span() is span
    assert not trace.get_current_span().get_span_context().is_valid
    assert sorted(_ended(job, "SUCCESS", recorded)) == ["process q", "run rec.direct"]


def test_making_a_span_current_is_found_through_the_api_with_a_fallback() -> None:
    """The direct variable set is found and checked once; without it, attach does the job."""
    import contextvars

    from millpond import telemetry

    def current_after(setter: Any, span: trace.Span) -> trace.Span:
        setter(span)
        return trace.get_current_span()

    span = RecordedSpan(None, TRACE, "", "run x", otlp_wire.KIND_INTERNAL, b"", None)
    found = contextvars.Context().run(telemetry._otel_context_variable)
    assert found is not None
    direct = telemetry._current_setter(found)
    fallback = telemetry._current_setter(None)
    assert direct.__name__ == "make_current" and fallback.__name__ == "attach"
    for setter in (direct, fallback):
        assert contextvars.Context().run(current_after, setter, span) is span
        assert trace.get_current_span() is not span
