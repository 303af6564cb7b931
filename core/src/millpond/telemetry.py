"""OpenTelemetry tracing of a task's trip: `publish <queue>` -> `process <queue>` -> `run <task>`.

The spans follow the OpenTelemetry messaging conventions: a PRODUCER span named
`{messaging.operation.name} {destination}` whose context travels in the message headers (W3C
`traceparent`/`tracestate`, where Celery's instrumentation puts them too); a CONSUMER `process` span
the worker opens around the pool's `on_apply` and ends when the job completes; an INTERNAL `run`
span in the execution unit, whatever thread, child process or greenlet that is, because the job
carries the `process` span's context across.

`process` always links to the producer's span (the conventions require the link); by default it is
also its child, so Jaeger shows one trace from `publish` to `run`. With the `trace_link` setting it
starts a new trace instead, linked only: useful when one producer trace fans out into thousands of
tasks.

`TRACING` is the hot path's switch: with no tracer provider installed it is False and nothing here
runs. `refresh()` re-reads it after a provider is installed (`observability.configure_tracing` and
the worker's start-up call it).
"""

from __future__ import annotations

import re
import time
import traceback as _traceback
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from millpond.exceptions import Retry

if TYPE_CHECKING:
    from millpond.pool import Job, Outcome

TRACING = False
#: "parent": `process` is a child of `publish` (one trace); "link": a new trace, linked to it
PROCESS_PARENTING = "parent"
#: `messaging.system` of spans made without a broker at hand (the worker sets its broker's)
MESSAGING_SYSTEM = "millpond"

# Attribute names, in one place (OpenTelemetry messaging conventions, then millpond's own).
SYSTEM = "messaging.system"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
DESTINATION = "messaging.destination.name"
MESSAGE_ID = "messaging.message.id"
ERROR_TYPE = "error.type"
TASK_NAME = "millpond.task.name"
TASK_RETRIES = "millpond.task.retries"
TASK_STATE = "millpond.task.state"
QUEUE_WAIT_MS = "millpond.task.queue_wait_ms"
DELIVERY_COUNT = "millpond.message.delivery_count"
POOL = "millpond.pool"

#: outcome states that make the `process` span an error
_ERROR_STATES = frozenset({"FAILURE", "LOST", "TIMEOUT"})
#: states decided by the pool (the `run` span may never have ended): record the exception here
_POOL_DECIDED = frozenset({"LOST", "TIMEOUT"})

_propagator = TraceContextTextMapPropagator()
_EMPTY = otel_context.Context()
_tracer: trace.Tracer | None = None
_process_base: dict[tuple[str, str, str], dict[str, Any]] = {}


def refresh(parenting: str | None = None, system: str | None = None) -> bool:
    """Re-read whether a real tracer provider is installed; call after configuring OpenTelemetry."""
    global TRACING, _tracer, PROCESS_PARENTING, MESSAGING_SYSTEM
    provider = trace.get_tracer_provider()
    TRACING = not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
    _tracer = trace.get_tracer("millpond") if TRACING else None
    if parenting:
        if parenting not in ("parent", "link"):
            raise ValueError(f"parenting must be 'parent' or 'link', got {parenting!r}")
        PROCESS_PARENTING = parenting
    if system:
        MESSAGING_SYSTEM = system
    _process_base.clear()
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


#: the common case, W3C version 00 in lower-case hex; anything else goes to the propagator
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def _remote_span_context(traceparent: str, tracestate: str | None) -> trace.SpanContext | None:
    """The producer's span context from its headers, or None when absent or invalid.

    A version-00 header (what every current SDK sends) is parsed with one anchored match; other
    versions and malformed values go through the standard propagator, which knows the rules.
    """
    match = _TRACEPARENT_00.fullmatch(traceparent)
    if match is None:
        span_ctx = trace.get_current_span(_extract(traceparent, tracestate)).get_span_context()
        return span_ctx if span_ctx.is_valid else None
    trace_id, span_id = int(match[1], 16), int(match[2], 16)
    if not trace_id or not span_id:
        return None
    return trace.SpanContext(
        trace_id,
        span_id,
        is_remote=True,
        trace_flags=trace.TraceFlags(int(match[3], 16)),
        trace_state=trace.TraceState.from_header([tracestate]) if tracestate else None,
    )


def _header(span_ctx: trace.SpanContext) -> tuple[str, str | None]:
    """(traceparent, tracestate) of a span context, formatted without a propagator round trip."""
    traceparent = f"00-{span_ctx.trace_id:032x}-{span_ctx.span_id:016x}-{span_ctx.trace_flags:02x}"
    state = span_ctx.trace_state.to_header() if span_ctx.trace_state else None
    return traceparent, state or None


# -- producer ------------------------------------------------------------------------------------
@contextmanager
def publish_span(
    queue: str,
    task_name: str,
    task_id: str,
    headers: dict[str, Any],
    parent: str | None = None,
    *,
    system: str | None = None,
    retries: int = 0,
) -> Iterator[None]:
    """The producer side: a PRODUCER span whose context travels in `headers`.

    `parent` (a traceparent) makes it a child of that span instead of the current one: the worker
    uses it so a retry's `publish` belongs to the trace of the run that asked for it. `system` is
    the broker's `messaging.system` (the app passes its broker's).
    """
    if not TRACING:
        yield
        return
    ctx = _extract(parent, None) if parent else None
    attributes: dict[str, Any] = {
        SYSTEM: system or MESSAGING_SYSTEM,
        OPERATION_TYPE: "send",
        OPERATION_NAME: "publish",
        DESTINATION: queue,
        MESSAGE_ID: task_id,
        TASK_NAME: task_name,
    }
    if retries:
        attributes[TASK_RETRIES] = retries
    with tracer().start_as_current_span(
        f"publish {queue}", context=ctx, kind=SpanKind.PRODUCER, attributes=attributes
    ) as span:
        span_ctx = span.get_span_context()
        if span_ctx.is_valid:
            traceparent, tracestate = _header(span_ctx)
            headers["traceparent"] = traceparent
            if tracestate:
                headers["tracestate"] = tracestate
        yield


# -- worker: the `process` span ------------------------------------------------------------------
def _base_attributes(queue: str, pool_name: str) -> dict[str, Any]:
    """The attributes every `process` span of a queue shares, built once per queue and pool."""
    key = (queue, pool_name, MESSAGING_SYSTEM)
    base = _process_base.get(key)
    if base is None:
        base = _process_base[key] = {
            SYSTEM: MESSAGING_SYSTEM,
            OPERATION_TYPE: "process",
            OPERATION_NAME: "process",
            DESTINATION: queue,
            POOL: pool_name,
        }
    return base


def start_process_span(job: Job, pool_name: str) -> None:
    """Open the CONSUMER span for a job and put its context on the job for the `run` span.

    The producer's context is extracted once, here; the queue wait (from the `millpond_sent_at`
    header) is an attribute at span start, so samplers and tail-based collectors see it.
    """
    attributes = dict(_base_attributes(job.queue, pool_name))
    attributes[MESSAGE_ID] = job.task_id
    attributes[TASK_NAME] = job.task_name
    attributes[TASK_RETRIES] = job.retries
    attributes[DELIVERY_COUNT] = job.delivery_count
    sent_at = job.sent_at
    if sent_at is not None:
        attributes[QUEUE_WAIT_MS] = max(0.0, (time.time() - sent_at) * 1000.0)
    links: list[Link] | None = None
    parent = _EMPTY  # a new trace: never the worker thread's current span
    if job.producer_traceparent:
        producer = _remote_span_context(job.producer_traceparent, job.producer_tracestate)
        if producer is not None:
            links = [Link(producer)]
            if PROCESS_PARENTING == "parent":
                parent = trace.set_span_in_context(trace.NonRecordingSpan(producer), _EMPTY)
    span = tracer().start_span(
        f"process {job.queue}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        links=links,
    )
    job.span = span
    job.traceparent, job.tracestate = _header(span.get_span_context())


def end_process_span(job: Job, outcome: Outcome) -> None:
    span = job.span
    if span is None:
        return
    job.span = None
    state = outcome.state
    span.set_attribute(TASK_STATE, state)
    if state in _ERROR_STATES:
        error_type = outcome.exc_type or state
        span.set_attribute(ERROR_TYPE, error_type)
        span.set_status(Status(StatusCode.ERROR, f"{error_type}: {outcome.exc_message}"))
        if state in _POOL_DECIDED:
            span.add_event(
                "exception",
                _exception_attributes(error_type, outcome.exc_message, outcome.traceback),
            )
    elif state == "RETRY":
        attrs = _exception_attributes(outcome.exc_type or "Retry", outcome.exc_message, None)
        attrs["millpond.retry.countdown"] = outcome.countdown or 0.0
        if outcome.eta is not None:
            attrs["millpond.retry.eta"] = outcome.eta
        span.add_event("retry", attrs)
    span.end()


def _exception_attributes(exc_type: str, message: str, stacktrace: str | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {"exception.type": exc_type, "exception.message": message}
    if stacktrace:
        attrs["exception.stacktrace"] = stacktrace
    return attrs


# -- execution unit: the `run` span ---------------------------------------------------------------
@contextmanager
def run_span(job: Job) -> Iterator[trace.Span | None]:
    """The `run <task>` span inside the execution unit, child of the job's `process` span.

    In the worker process the live `process` span object is the parent (no parsing); in a child
    process or after pickling, its context comes from `job.traceparent`. One context attach
    makes the span current for the task body (user spans and log lines see it).
    """
    if not TRACING or not job.traceparent:
        yield None
        return
    process = job.span
    if process is None:
        parent_ctx = _remote_span_context(job.traceparent, job.tracestate)
        if parent_ctx is None:
            yield None
            return
        process = trace.NonRecordingSpan(parent_ctx)
    span = tracer().start_span(
        f"run {job.task_name}",
        context=trace.set_span_in_context(process, _EMPTY),
        kind=SpanKind.INTERNAL,
        attributes={TASK_NAME: job.task_name, MESSAGE_ID: job.task_id, TASK_RETRIES: job.retries},
    )
    token = otel_context.attach(trace.set_span_in_context(span, _EMPTY))
    try:
        yield span
    except BaseException as exc:  # escaped the task's own handling (KeyboardInterrupt, ...)
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        otel_context.detach(token)
        span.end()


def traced(span: trace.Span | None, outcome: Outcome, exc: BaseException | None) -> Outcome:
    """Note a failure or a retry on the `run` span, then return `outcome` unchanged.

    The execution unit catches the task's exception itself (to build the outcome), so the span's
    own `record_exception` never sees it: this records it. A retry is an event, not an error.
    """
    if span is None:
        return outcome
    if isinstance(exc, Retry):
        exc = exc.exc  # the reason the task gave, if any
    if outcome.state == "RETRY":
        attrs: dict[str, Any] = {"millpond.retry.countdown": outcome.countdown or 0.0}
        if exc is not None:
            attrs.update(
                _exception_attributes(
                    type(exc).__qualname__, str(exc), "".join(_traceback.format_exception(exc))
                )
            )
        span.add_event("retry", attrs)
    elif outcome.state == "FAILURE":
        if exc is not None:
            span.record_exception(exc)
        error_type = outcome.exc_type or "Exception"
        span.set_attribute(ERROR_TYPE, error_type)
        span.set_status(Status(StatusCode.ERROR, f"{error_type}: {outcome.exc_message}"))
    return outcome


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span as hex, for log lines; None when not tracing."""
    span_ctx = trace.get_current_span().get_span_context()
    if not span_ctx.is_valid:
        return None
    return format(span_ctx.trace_id, "032x"), format(span_ctx.span_id, "016x")
