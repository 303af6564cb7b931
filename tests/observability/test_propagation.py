"""The tracing hook's own W3C trace-context parsing and writing give exactly what the global
propagator gives: for every header form, with tracestate and baggage, and under another
propagator (where the hook hands everything to `opentelemetry.propagate`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator, default_getter, default_setter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import TraceState

from millpond_tracing import hooks as tracing

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"

HEADERS: list[dict[str, Any]] = [
    {},
    {"traceparent": f"00-{TRACE}-{SPAN}-01"},
    {"traceparent": f"00-{TRACE}-{SPAN}-00"},
    {"traceparent": f"00-{TRACE}-{SPAN}-ff"},
    {"traceparent": f"00-{TRACE.upper()}-{SPAN}-01"},
    {"traceparent": f"  00-{TRACE}-{SPAN}-01"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01 \t"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01\n"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01-extra"},
    {"traceparent": f"01-{TRACE}-{SPAN}-01-future"},
    {"traceparent": f"ff-{TRACE}-{SPAN}-01"},
    {"traceparent": f"00-{'0' * 32}-{SPAN}-01"},
    {"traceparent": f"00-{TRACE}-{'0' * 16}-01"},
    {"traceparent": f"00-{TRACE}-{SPAN}-1"},
    {"traceparent": f"00-{TRACE[:-1]}_-{SPAN}-01"},
    {"traceparent": "not-a-traceparent"},
    {"traceparent": ""},
    {"traceparent": None},
    {"traceparent": [f"00-{TRACE}-{SPAN}-01"]},
    {"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "vendor=abc,other=x"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "=broken"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01", "baggage": "tenant=acme"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": None},
]


def _seen(ctx: otel_context.Context) -> tuple[Any, ...]:
    """What a context carries that a span or the task could see."""
    ids = trace.get_current_span(ctx).get_span_context()
    return (
        ids.trace_id,
        ids.span_id,
        ids.is_remote,
        int(ids.trace_flags),
        tuple(ids.trace_state.items()),
        ids.is_valid,
        dict(baggage.get_all(ctx)),
    )


@pytest.mark.parametrize("headers", HEADERS, ids=lambda h: repr(h)[:60])
def test_extract_is_the_propagators(headers: dict[str, Any]) -> None:
    expected = propagate.extract(headers, context=otel_context.Context())
    assert _seen(tracing._extract(headers)) == _seen(expected)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # a loaded CI machine
@given(
    version=st.sampled_from(["00", "01", "ff", "0g", "0"]),
    trace_id=st.text(alphabet="0123456789abcdefABCDEF", min_size=31, max_size=33),
    span_id=st.text(alphabet="0123456789abcdef", min_size=15, max_size=17),
    flags=st.text(alphabet="0123456789abcdef-", min_size=1, max_size=3),
    tail=st.sampled_from(["", " ", "-x", "\n"]),
)
def test_extract_agrees_on_generated_headers(
    version: str, trace_id: str, span_id: str, flags: str, tail: str
) -> None:
    headers = {"traceparent": f"{version}-{trace_id}-{span_id}-{flags}{tail}"}
    expected = propagate.extract(headers, context=otel_context.Context())
    assert _seen(tracing._extract(headers)) == _seen(expected)


def _span(trace_state: TraceState | None = None, sampled: bool = True) -> NonRecordingSpan:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return NonRecordingSpan(SpanContext(int(TRACE, 16), int(SPAN, 16), False, flags, trace_state))


@pytest.mark.parametrize(
    "span",
    [
        _span(),
        _span(sampled=False),
        _span(TraceState([("vendor", "abc"), ("k", "v")])),
        trace.INVALID_SPAN,
    ],
    ids=["sampled", "unsampled", "tracestate", "invalid"],
)
def test_carrier_and_inject_are_the_propagators(span: trace.Span) -> None:
    expected: dict[str, str] = {}
    propagate.inject(expected, context=trace.set_span_in_context(span, otel_context.Context()))
    assert tracing._carrier(span) == expected
    injected: dict[str, str] = {}
    tracing._inject(injected, span, None)
    assert injected == expected


def test_inject_carries_the_callers_baggage() -> None:
    span = _span()
    token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        expected: dict[str, str] = {}
        propagate.inject(expected, context=trace.set_span_in_context(span, None))
        injected: dict[str, str] = {}
        tracing._inject(injected, span, None)
    finally:
        otel_context.detach(token)
    assert injected == expected
    assert "baggage" in injected


class _Upper(TextMapPropagator):
    """A propagator of another kind: its own header, its own format."""

    def extract(self, carrier: Any, context: Any = None, getter: Any = default_getter) -> Any:
        value = (getter.get(carrier, "x-trace") or [None])[0]
        ctx = context if context is not None else otel_context.Context()
        if not value:
            return ctx
        trace_id, span_id = (int(part, 16) for part in value.split(":"))
        return trace.set_span_in_context(
            NonRecordingSpan(SpanContext(trace_id, span_id, True, TraceFlags(1))), ctx
        )

    def inject(self, carrier: Any, context: Any = None, setter: Any = default_setter) -> None:
        ids = trace.get_current_span(context).get_span_context()
        setter.set(carrier, "x-trace", f"{ids.trace_id:X}:{ids.span_id:X}")

    @property
    def fields(self) -> set[str]:
        return {"x-trace"}


@pytest.fixture
def other_propagator() -> Iterator[None]:
    before = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator(), _Upper()]))
    try:
        yield
    finally:
        propagate.set_global_textmap(before)


def test_another_propagator_is_always_asked(other_propagator: None) -> None:
    headers = {"traceparent": f"00-{TRACE}-{SPAN}-01", "x-trace": "ABC:DEF"}
    expected = propagate.extract(headers, context=otel_context.Context())
    got = tracing._extract(headers)
    assert _seen(got) == _seen(expected)
    assert trace.get_current_span(got).get_span_context().span_id == 0xDEF  # _Upper ran last
    carrier = tracing._carrier(_span())
    assert carrier["x-trace"] == f"{int(TRACE, 16):X}:{int(SPAN, 16):X}"
    assert carrier["traceparent"] == f"00-{TRACE}-{SPAN}-01"


def test_the_default_propagator_is_recognised() -> None:
    assert tracing._w3c_propagator()  # OTEL_PROPAGATORS unset: tracecontext,baggage
