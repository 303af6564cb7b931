"""millpond-otlp writes, for the same spans, exactly the request the standard exporter's encoder
writes: compared byte for byte and decoded with opentelemetry-proto, over every part of a span."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.trace.span import TraceState

from millpond_otlp import encode_request

REMOTE = SpanContext(
    0x4BF92F3577B34DA6A3CE929D0E0E4736,
    0x00F067AA0BA902B7,
    is_remote=True,
    trace_flags=TraceFlags(1),
    trace_state=TraceState([("vendor", "abc"), ("other", "y")]),
)
LOCAL_LINK = SpanContext(0x1, 0x2, is_remote=False, trace_flags=TraceFlags(1))

#: every attribute value type the SDK keeps, and the edges of their encodings
ATTRIBUTES: dict[str, Any] = {
    "str": "value",
    "str.empty": "",
    "str.unicode": "żółw 🐢",
    "str.long": "x" * 200,  # a two-byte length, and longer than the pair cache takes
    "str.uuid": "0f8fad5b-d9cb-469f-a165-70867728950e",
    "bool.true": True,
    "bool.false": False,
    "int.zero": 0,
    "int.small": 1,
    "int.big": 2**62,
    "int.max": 2**63 - 1,
    "int.min": -(2**63),
    "int.negative": -5,
    "float": 1.5,
    "float.zero": 0.0,
    "float.negative": -2.25e-300,
    "float.inf": math.inf,
    "bytes": b"\x00\xff",
    "seq.str": ("a", "b"),
    "seq.int": (1, -2, 3),
    "seq.float": (0.5, 1.0),
    "seq.bool": (True, False),
    "seq.empty": (),
    "seq.none": ("a", None),
    "map": {"k": "v", "n": 1},
    "none": None,
}


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource({"service.name": "svc", "host.cores": 2}, "https://schema/1.0")
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def _same(spans: Sequence[ReadableSpan]) -> bytes:
    """Assert both encoders agree on `spans`; the bytes."""
    expected = encode_spans(spans)
    mine = encode_request(spans)
    assert mine == expected.SerializePartialToString()
    assert ExportTraceServiceRequest.FromString(mine) == expected
    return mine


def test_a_span_with_every_part(provider: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    sdk, exporter = provider
    tracer = sdk.get_tracer("scope.one", "1.2.3", schema_url="https://scope-schema")
    parent = set_span_in_context(NonRecordingSpan(REMOTE))
    with tracer.start_as_current_span(
        "process queue",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes=ATTRIBUTES,
        links=[Link(REMOTE, {"link.attr": "x", "n": 3}), Link(LOCAL_LINK)],
    ) as span:
        span.add_event("retry", {"exception.type": "ConnectionError", "countdown": 0.5})
        span.add_event("")  # no name, no attributes
        span.add_event("at", timestamp=123)
        span.set_status(Status(StatusCode.ERROR, "KeyError: 'x'"))
        with tracer.start_as_current_span("child", kind=SpanKind.INTERNAL) as child:
            child.set_status(Status(StatusCode.OK))
    spans = exporter.get_finished_spans()
    assert len(spans) == 2
    _same(spans)
    request = ExportTraceServiceRequest.FromString(encode_request(spans))
    (resource_spans,) = request.resource_spans
    assert resource_spans.schema_url == "https://schema/1.0"
    (scope_spans,) = resource_spans.scope_spans
    assert scope_spans.scope.name == "scope.one"
    assert scope_spans.scope.version == "1.2.3"
    assert scope_spans.schema_url == "https://scope-schema"
    child_pb, process_pb = scope_spans.spans
    assert process_pb.trace_state == "vendor=abc,other=y"
    assert process_pb.parent_span_id == REMOTE.span_id.to_bytes(8, "big")
    assert process_pb.flags == 0x300  # the parent is remote
    assert child_pb.flags == 0x100
    assert [link.flags for link in process_pb.links] == [0x300, 0x100]
    assert process_pb.links[0].trace_state == ""  # the standard encoder leaves it out too


@pytest.mark.parametrize("kind", list(SpanKind))
def test_every_kind_and_status(
    provider: tuple[TracerProvider, InMemorySpanExporter], kind: SpanKind
) -> None:
    sdk, exporter = provider
    tracer = sdk.get_tracer("kinds")
    for status in (
        None,
        Status(StatusCode.OK),
        Status(StatusCode.ERROR),
        Status(StatusCode.ERROR, "boom"),
    ):
        with tracer.start_as_current_span(f"span {kind.name}", kind=kind) as span:
            if status is not None:
                span.set_status(status)
    _same(exporter.get_finished_spans())


def test_dropped_counts() -> None:
    exporter = InMemorySpanExporter()
    limits = SpanLimits(
        max_span_attributes=2,
        max_events=1,
        max_links=1,
        max_event_attributes=1,
        max_link_attributes=1,
    )
    sdk = TracerProvider(span_limits=limits)
    sdk.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = sdk.get_tracer("limits")
    with tracer.start_as_current_span(
        "limited",
        attributes={"a": 1, "b": 2, "c": 3},
        links=[Link(LOCAL_LINK), Link(REMOTE, {"x": 1, "y": 2})],  # the newest is kept
    ) as span:
        span.add_event("first")
        span.add_event("second", {"x": 1, "y": 2, "z": 3})  # the list keeps the newest
    (done,) = exporter.get_finished_spans()
    assert done.dropped_attributes == 1
    assert done.dropped_events == 1
    assert done.dropped_links == 1
    request = ExportTraceServiceRequest.FromString(_same([done]))
    span_pb = request.resource_spans[0].scope_spans[0].spans[0]
    assert span_pb.dropped_attributes_count == 1
    assert span_pb.dropped_events_count == 1
    assert span_pb.dropped_links_count == 1
    assert span_pb.events[0].dropped_attributes_count == 2
    assert span_pb.links[0].dropped_attributes_count == 1


def test_resources_and_scopes_are_grouped_in_order_of_first_appearance() -> None:
    exporter = InMemorySpanExporter()
    sdks = [TracerProvider(resource=Resource({"service.name": name})) for name in ("one", "two")]
    for sdk in sdks:
        sdk.add_span_processor(SimpleSpanProcessor(exporter))
    tracers = [
        sdks[0].get_tracer("a"),
        sdks[1].get_tracer("a"),
        sdks[0].get_tracer("b", "2", attributes={"scope.attr": "x"}),
        sdks[0].get_tracer("a"),
    ]
    for i in range(12):
        with tracers[i % len(tracers)].start_as_current_span(f"s{i}"):
            pass
    spans = exporter.get_finished_spans()
    # an equal resource that is another object joins the same group, as in a dict
    twin = ReadableSpan(
        name="twin",
        context=SpanContext(5, 6, False, TraceFlags(1)),
        resource=Resource({"service.name": "one"}),
        instrumentation_scope=InstrumentationScope("a", ""),  # what get_tracer("a") keeps
        start_time=1,
        end_time=2,
    )
    request = ExportTraceServiceRequest.FromString(_same([*spans, twin]))
    assert [rs.resource.attributes[0].value.string_value for rs in request.resource_spans] == [
        "one",
        "two",
    ]
    assert [ss.scope.name for ss in request.resource_spans[0].scope_spans] == ["a", "b"]
    assert request.resource_spans[0].scope_spans[0].spans[-1].name == "twin"


def test_hand_made_readable_spans_use_the_public_api() -> None:
    """No BoundedAttributes, no BoundedList, no scope, no times: the fallbacks."""
    spans = [
        ReadableSpan(
            name="plain",
            context=SpanContext(7, 8, False),
            attributes=MappingProxyType({"a": "b", "n": 2}),
            events=(Event("e", {"k": "v"}, timestamp=10),),
            links=(Link(REMOTE, {"l": True}),),
            resource=Resource({}),
        ),
        ReadableSpan(
            name="", context=SpanContext(9, 10, False), resource=Resource({}), start_time=5
        ),
        ReadableSpan(
            name="dict-attributes",
            context=SpanContext(9, 11, False),
            parent=SpanContext(9, 10, False),
            attributes={"a": 1},
            resource=Resource({}),
            end_time=6,
        ),
    ]
    _same(spans)


def test_an_attribute_protobuf_cannot_hold_is_left_out_and_logged(
    provider: tuple[TracerProvider, InMemorySpanExporter], caplog: pytest.LogCaptureFixture
) -> None:
    sdk, exporter = provider
    with sdk.get_tracer("t").start_as_current_span(
        "odd", attributes={"ok": 1, "huge": 2**64, "bad": "\ud800", "after": "x"}
    ):
        pass
    with caplog.at_level(logging.ERROR):
        request = ExportTraceServiceRequest.FromString(_same(exporter.get_finished_spans()))
    keys = [kv.key for kv in request.resource_spans[0].scope_spans[0].spans[0].attributes]
    assert keys == ["ok", "after"]
    assert "Failed to encode key huge" in caplog.text
    assert "Failed to encode key bad" in caplog.text


def test_millpond_process_spans(
    provider: tuple[TracerProvider, InMemorySpanExporter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spans the worker's tracing hook makes, in a batch of the size the batch processor
    sends (the pair caches fill and are reused across spans)."""
    from millpond.contracts.pool import Job, Outcome
    from millpond.states import TaskState
    from millpond_tracing.hooks import TracingHooks

    sdk, exporter = provider
    hooks = TracingHooks()
    hooks.system, hooks.pool = "redis", "threads"
    tracer = sdk.get_tracer("millpond", "0.1.0")
    monkeypatch.setattr("millpond_tracing.hooks.installed_tracer", lambda: tracer)
    for i in range(600):
        job = Job(
            task_id=f"task-{i:04d}-0000-0000-0000-000000000000",
            task_name="shop.charge",
            args=(),
            kwargs={},
            queue=f"q{i % 3}",
            retries=i % 2,
            sent_at=1.0,
        )
        job.headers = {"traceparent": f"00-{i + 1:032x}-{i + 1:016x}-01"}
        hooks.started(job)
        state = (TaskState.SUCCESS, TaskState.FAILURE, TaskState.RETRY)[i % 3]
        outcome = (
            Outcome(state=state)
            if state == TaskState.SUCCESS
            else Outcome.of(ConnectionError("db away"), state)
        )
        hooks.finished(job, outcome)
    spans = exporter.get_finished_spans()
    assert len(spans) == 600
    for start in range(0, 600, 512):
        _same(spans[start : start + 512])


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4).map(tuple),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(min_size=1, max_size=12), _values, max_size=8))
def test_generated_attributes(attributes: dict[str, Any]) -> None:
    exporter = InMemorySpanExporter()
    sdk = TracerProvider(resource=Resource({"service.name": "gen"}))
    sdk.add_span_processor(SimpleSpanProcessor(exporter))
    with sdk.get_tracer("gen").start_as_current_span("g", attributes=attributes) as span:
        span.add_event("e", attributes)
    _same(exporter.get_finished_spans())
