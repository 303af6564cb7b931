"""OpenTelemetry tracing around a task's trip: `publish <queue>` -> `process <queue>` -> `run <task>`.

The three spans follow the OpenTelemetry messaging conventions. The producer injects W3C trace
context into the message headers; the worker opens `process` (CONSUMER) around the pool's
`on_apply` until the job completes; the execution unit opens `run` (INTERNAL) as its child, whatever
thread, process or greenlet it runs in, because the job carries the `process` span's context.

`TRACING` is the hot path's switch: with no tracer provider configured it is False and none of this
runs. `refresh()` re-reads it after a provider is installed (the worker does so at start-up and in
each prefork child; `configure_from_env` calls it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from millpond.pool import Job, Outcome

TRACING = False
#: "parent": the `process` span is a child of `publish` (one trace); "link": a new trace linked to it
PROCESS_PARENTING = "parent"
MESSAGING_SYSTEM = "millpond"

_propagator = TraceContextTextMapPropagator()
_tracer: trace.Tracer | None = None


def refresh(parenting: str | None = None, system: str | None = None) -> bool:
    """Re-read whether a real tracer provider is installed; call after configuring OpenTelemetry."""
    global TRACING, _tracer, PROCESS_PARENTING, MESSAGING_SYSTEM
    provider = trace.get_tracer_provider()
    TRACING = not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
    _tracer = trace.get_tracer("millpond") if TRACING else None
    if parenting:
        PROCESS_PARENTING = parenting
    if system:
        MESSAGING_SYSTEM = system
    return TRACING


def tracer() -> trace.Tracer:
    return _tracer or trace.get_tracer("millpond")


def inject(carrier: MutableMapping[str, Any]) -> None:
    """Write the current trace context (`traceparent`, `tracestate`) into `carrier`."""
    _propagator.inject(carrier)


def _extract(traceparent: str | None, tracestate: str | None) -> otel_context.Context:
    carrier = {"traceparent": traceparent or ""}
    if tracestate:
        carrier["tracestate"] = tracestate
    return _propagator.extract(carrier)


@contextmanager
def publish_span(
    queue: str,
    task_name: str,
    task_id: str,
    headers: dict[str, Any],
    parent: str | None = None,
) -> Iterator[None]:
    """The producer side: a PRODUCER span whose context travels in `headers`.

    `parent` (a traceparent) makes it a child of that span instead of the current one: the worker
    uses it so a retry's `publish` belongs to the trace of the run that asked for it.
    """
    if not TRACING:
        yield
        return
    ctx = _extract(parent, None) if parent else None
    with tracer().start_as_current_span(
        f"publish {queue}",
        context=ctx,
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            "messaging.destination.name": queue,
            "messaging.message.id": task_id,
            "millpond.task.name": task_name,
        },
    ):
        inject(headers)
        yield


def start_process_span(job: Job, pool_name: str) -> None:
    """Open the CONSUMER span for a job and put its context on the job for the `run` span."""
    producer_ctx = _extract(job.producer_traceparent, job.producer_tracestate)
    links: list[Link] = []
    parent: otel_context.Context | None = producer_ctx
    if PROCESS_PARENTING == "link":
        span_ctx = trace.get_current_span(producer_ctx).get_span_context()
        if span_ctx.is_valid:
            links.append(Link(span_ctx))
        parent = otel_context.Context()
    attributes: dict[str, Any] = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": job.queue,
        "messaging.message.id": job.task_id,
        "millpond.task.name": job.task_name,
        "millpond.task.retries": job.retries,
        "millpond.pool": pool_name,
        "messaging.message.delivery_count": job.delivery_count,
    }
    span = tracer().start_span(
        f"process {job.queue}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        links=links,
    )
    job.span = span
    carrier: dict[str, Any] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    job.traceparent = carrier.get("traceparent")
    job.tracestate = carrier.get("tracestate")


def set_queue_wait(job: Job, sent_at: float | None) -> None:
    if job.span is not None and sent_at is not None:
        job.span.set_attribute("millpond.queue_wait_ms", max(0.0, (time.time() - sent_at) * 1000))


def end_process_span(job: Job, outcome: Outcome) -> None:
    span = job.span
    if span is None:
        return
    job.span = None
    span.set_attribute("millpond.task.state", outcome.state)
    if outcome.state in ("FAILURE", "LOST", "TIMEOUT"):
        span.set_status(Status(StatusCode.ERROR, f"{outcome.exc_type}: {outcome.exc_message}"))
    elif outcome.state == "RETRY":
        span.add_event("retry", {"millpond.retry.countdown": outcome.countdown or 0.0})
    span.end()


@contextmanager
def run_span(job: Job) -> Iterator[trace.Span | None]:
    """The `run <task>` span inside the execution unit, child of the job's `process` span."""
    if not TRACING or not job.traceparent:
        yield None
        return
    parent = _extract(job.traceparent, job.tracestate)
    token = otel_context.attach(parent)
    try:
        with tracer().start_as_current_span(
            f"run {job.task_name}",
            kind=SpanKind.INTERNAL,
            attributes={
                "millpond.task.name": job.task_name,
                "messaging.message.id": job.task_id,
                "millpond.task.retries": job.retries,
            },
            record_exception=True,
            set_status_on_exception=True,
        ) as span:
            yield span
    finally:
        otel_context.detach(token)


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span as hex, for log lines; None when not tracing."""
    span_ctx = trace.get_current_span().get_span_context()
    if not span_ctx.is_valid:
        return None
    return format(span_ctx.trace_id, "032x"), format(span_ctx.span_id, "016x")
