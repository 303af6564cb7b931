"""The OTLP test receiver decodes what the real OTLP/HTTP exporter sends, compressed or not."""

from __future__ import annotations

import gzip
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from millpond.testing.otlp import OtlpReceiver


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip])
def test_spans_from_the_real_exporter_arrive_decoded(
    receiver: OtlpReceiver, compression: Compression
) -> None:
    provider = TracerProvider(
        resource=Resource.create({"service.name": "receiver-test", "deployment": "ci"})
    )
    provider.add_span_processor(
        SimpleSpanProcessor(
            OTLPSpanExporter(endpoint=receiver.traces_endpoint, compression=compression)
        )
    )
    tracer = provider.get_tracer("tests.otlp")
    attributes: dict[str, Any] = {"n": 3, "ok": True, "tags": ["a", "b"]}
    with (
        tracer.start_as_current_span(
            "outer", kind=SpanKind.CONSUMER, attributes=attributes
        ) as outer,
        tracer.start_as_current_span("inner") as inner,
    ):
        inner.add_event("checkpoint")
        inner.set_status(Status(StatusCode.ERROR, "it broke"))
    provider.shutdown()

    spans = receiver.wait_for(lambda got: len(got) >= 2, timeout=10, what="two spans")
    by_name = {s.name: s for s in spans}
    got_outer, got_inner = by_name["outer"], by_name["inner"]
    assert got_outer.trace_id == format(outer.get_span_context().trace_id, "032x")
    assert got_outer.span_id == format(outer.get_span_context().span_id, "016x")
    assert got_outer.parent_span_id == ""
    assert got_inner.parent_span_id == got_outer.span_id
    assert got_inner.trace_id == got_outer.trace_id
    assert got_outer.kind == "CONSUMER"
    assert got_inner.kind == "INTERNAL"
    assert dict(got_outer.attributes) == {"n": 3, "ok": True, "tags": ["a", "b"]}
    assert (got_inner.status_code, got_inner.status_message) == ("ERROR", "it broke")
    assert got_outer.status_code == "UNSET"
    assert got_inner.events == ("checkpoint",)
    assert got_outer.service_name == "receiver-test"
    assert got_outer.resource["deployment"] == "ci"
    assert got_outer.scope == "tests.otlp"
    assert got_outer.end_ns >= got_outer.start_ns > 0
    assert receiver.named("inner") == [got_inner]
    assert receiver.trace(got_outer.trace_id) == spans


def post(url: str, body: bytes, **headers: str) -> int:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_bad_requests_get_clear_errors_and_change_nothing(receiver: OtlpReceiver) -> None:
    proto = "application/x-protobuf"
    assert post(f"{receiver.endpoint}/v2/whatever", b"", **{"Content-Type": proto}) == 404
    assert post(receiver.traces_endpoint, b"{}", **{"Content-Type": "application/json"}) == 415
    assert post(receiver.traces_endpoint, b"\xff\x00garbage", **{"Content-Type": proto}) == 400
    assert (
        post(
            receiver.traces_endpoint,
            b"not gzip",
            **{"Content-Type": proto, "Content-Encoding": "gzip"},
        )
        == 400
    )
    assert receiver.spans == []
    assert len(receiver.rejected) == 3
    assert "protobuf" in receiver.rejected[0][1]
    # logs and metrics are accepted (counted) so a process exporting everything stays quiet
    assert (
        post(
            f"{receiver.endpoint}/v1/logs",
            gzip.compress(b""),
            **{"Content-Type": proto, "Content-Encoding": "gzip"},
        )
        == 200
    )
    assert receiver.requests["/v1/logs"] == 1


def test_wait_for_says_what_arrived_when_it_times_out(receiver: OtlpReceiver) -> None:
    with pytest.raises(AssertionError, match=r"waiting for the impossible: 0 spans arrived"):
        receiver.wait_for(lambda spans: False, timeout=0.05, what="the impossible")


def test_env_points_an_sdk_process_here(receiver: OtlpReceiver) -> None:
    env = receiver.env("svc", OTEL_BSP_SCHEDULE_DELAY="10")
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == receiver.endpoint
    assert env["OTEL_SERVICE_NAME"] == "svc"
    assert env["OTEL_BSP_SCHEDULE_DELAY"] == "10"
    with pytest.raises(RuntimeError, match="not started"):
        _ = OtlpReceiver().endpoint
