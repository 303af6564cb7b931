"""Tracing a task's trip as OpenTelemetry SDK spans: `publish <queue>` -> `process <queue>` -> the
task body, as one hooks implementation (`millpond.hooks` entry point `tracing`, from the
`millpond-tracing` distribution).

The spans follow the OpenTelemetry messaging conventions:

* `publish <queue>` (PRODUCER), around every publish, in the publishing process; its context
  travels in the message headers through the global propagator (W3C `traceparent`/`tracestate`
  by default, where Celery's instrumentation puts them too).
* `process <queue>` (CONSUMER), opened when the worker hands the job to the pool and ended when
  the pool reports it done, so it covers `on_apply` in every pool. It is current inside the task
  body, in whatever thread, child process or greenlet runs it: the body's own spans are its
  children and log lines carry its ids. One span per task, not two: the conventions allow it, and
  an SDK span costs about as much CPU as a no-op task.

`process` always links to the producer's span (the conventions require the link); by default it is
also its child, so Jaeger shows one trace from `delay()` to the task body. With the `trace_link`
setting it starts a new trace instead, linked only: useful when one trace fans out into thousands.

Spans are SDK spans on the global `TracerProvider`, so a user's own span processors, samplers and
exporters see every one. Whoever installed that provider (millpond's set-up from `OTEL_*`, or the
application) is found when a span is about to be made, not once at start-up: until a real
provider is installed the hooks do nothing and add no headers.

Context travels through the global propagator. When that is OpenTelemetry's default (W3C trace
context and baggage), the worker reads a message's lone `traceparent` and writes the job's carrier
itself, giving exactly what the propagator would for a fraction of its cost; everything else (other
propagators, `tracestate` or `baggage` headers, any other header form) goes through
`opentelemetry.propagate`. What it costs per task: docs/benchmarks.md#tracing.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import (
    INVALID_SPAN_CONTEXT,
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from millpond import __version__
from millpond.contracts.hooks import Hooks, Publication
from millpond.states import FAILED_STATES, TaskState
from millpond.wire.protocol import PERIODIC_TASK_NAME
from millpond_tracing import attributes as attr
from millpond_tracing import otel

if TYPE_CHECKING:
    from millpond.contracts.hooks import WorkerView
    from millpond.contracts.pool import Job, Outcome

_EMPTY = otel_context.Context()


def installed_tracer() -> trace.Tracer | None:
    """millpond's tracer once a real tracer provider is installed, else None.

    The global provider can be set once per process, so a real one, once seen, stays; until then
    this costs `otel.provider_installed`'s check per span that would have been made.
    """
    global _tracer
    if _tracer is not None:
        return _tracer
    if not otel.provider_installed():
        return None
    _tracer = trace.get_tracer_provider().get_tracer("millpond", __version__)
    return _tracer


_tracer: trace.Tracer | None = None


# -- W3C trace context without the propagator machinery ------------------------------------------
#: the one form of `traceparent` producers send (version 00, lower-case hex, nothing around it);
#: anything else goes to the propagator, which decides exactly as it always does
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_W3C = (TraceContextTextMapPropagator, W3CBaggagePropagator)
_checked: tuple[object, bool] = (None, False)


def _w3c_propagator() -> bool:
    """Whether the global propagator is OpenTelemetry's default (W3C trace context, with or without
    W3C baggage), for which `_extract` and `_inject` below give exactly what it would.

    Checked again whenever the global propagator is replaced; a propagator of any other kind (B3,
    Jaeger, a composite with anything else in it) always goes through `propagate`.
    """
    global _checked
    textmap = propagate.get_global_textmap()
    if textmap is _checked[0]:
        return _checked[1]
    if type(textmap) is TraceContextTextMapPropagator:
        verdict = True
    elif type(textmap) is CompositePropagator:
        # The composite keeps its list in `_propagators`; read defensively: without it, no fast path.
        inner = [type(p) for p in getattr(textmap, "_propagators", (None,))]
        verdict = TraceContextTextMapPropagator in inner and all(t in _W3C for t in inner)
    else:
        verdict = False
    _checked = (textmap, verdict)
    return verdict


def _extract(headers: Mapping[str, Any]) -> otel_context.Context:
    """`propagate.extract(headers, context=_EMPTY)`, parsing the common case itself.

    The fast path takes only a lone `traceparent` in its canonical form under the default
    propagator: with a `tracestate` or `baggage` header, or any other form, the propagator parses.
    """
    value = headers.get("traceparent")
    if (
        value.__class__ is str
        and "tracestate" not in headers
        and "baggage" not in headers
        and _w3c_propagator()
    ):
        match = _TRACEPARENT.fullmatch(value)
        if match is not None:
            trace_hex, span_hex, flags = match.groups()
            trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
            if not (trace_id and span_id):
                return _EMPTY  # all-zero ids: the propagator ignores the header as well
            producer = SpanContext(trace_id, span_id, True, _trace_flags(flags))
            return trace.set_span_in_context(NonRecordingSpan(producer), _EMPTY)
    return propagate.extract(headers, context=_EMPTY)


_FLAGS: dict[str, TraceFlags] = {}


def _trace_flags(text: str) -> TraceFlags:
    flags = _FLAGS.get(text)
    if flags is None:
        flags = _FLAGS[text] = TraceFlags(int(text, 16))  # at most 256 of them
    return flags


def _inject(
    carrier: MutableMapping[str, Any], span: trace.Span, parent: otel_context.Context | None
) -> None:
    """`propagate.inject(carrier, context=set_span_in_context(span, parent))`, written directly
    when the propagator is the default one and `parent` carries no baggage."""
    context = trace.set_span_in_context(span, parent)
    if _w3c_propagator() and not baggage.get_all(context):
        _write_traceparent(carrier, span.get_span_context())
    else:
        propagate.inject(carrier, context=context)


def _carrier(span: trace.Span) -> dict[str, str]:
    """What `propagate.inject` writes for `span` alone (an empty context around it: no baggage)."""
    carrier: dict[str, str] = {}
    if _w3c_propagator():
        _write_traceparent(carrier, span.get_span_context())
    else:
        propagate.inject(carrier, context=trace.set_span_in_context(span, _EMPTY))
    return carrier


def _write_traceparent(carrier: MutableMapping[str, Any], ids: SpanContext) -> None:
    """The W3C trace-context propagator's `inject`, for one span context."""
    if ids == INVALID_SPAN_CONTEXT:
        return
    carrier["traceparent"] = f"00-{ids.trace_id:032x}-{ids.span_id:016x}-{ids.trace_flags:02x}"
    if ids.trace_state:
        carrier["tracestate"] = ids.trace_state.to_header()


def _exception_attributes(exc_type: str, message: str, stacktrace: str | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {"exception.type": exc_type, "exception.message": message}
    if stacktrace:
        attrs["exception.stacktrace"] = stacktrace
    return attrs


class TracingHooks(Hooks):
    """The `publish` and `process` spans, and the task body run inside `process`."""

    order = 10

    def __init__(self) -> None:
        #: "parent": `process` continues the producer's trace; "link": a new trace, linked
        self.parenting = "parent"
        self.system = "millpond"
        self.pool = ""
        #: per queue: the `process` span's name and the attributes every such span shares
        self._queues: dict[str, tuple[str, dict[str, Any]]] = {}

    def process_starting(self, service_name: str) -> None:
        """A millpond command owns the process: install a provider from `OTEL_*` under its name
        (before the worker imports the app, so the app module can add span processors to it)."""
        otel.configure_tracing(service_name)

    def worker_starting(self, worker: WorkerView) -> None:
        """Install a provider from `OTEL_*` unless the app did (it is imported by now)."""
        otel.configure_tracing("millpond-worker")
        settings = worker.settings
        self.parenting = "link" if settings.trace_link else "parent"
        self.system = worker.app.broker.system
        self.pool = settings.pool
        self._queues.clear()

    # -- producer ---------------------------------------------------------------------------------
    def before_publish(self, publication: Publication) -> Any:
        tracer = installed_tracer()
        if tracer is None:
            return None
        parent = propagate.extract(publication.parent) if publication.parent else None
        attributes: dict[str, Any] = {
            attr.SYSTEM: publication.system,
            attr.OPERATION_TYPE: "send",
            attr.OPERATION_NAME: "publish",
            attr.DESTINATION: publication.queue,
            attr.MESSAGE_ID: publication.task_id,
            attr.TASK_NAME: publication.task_name,
        }
        if publication.retries:
            attributes[attr.TASK_RETRIES] = publication.retries
        entry = publication.message.headers.get(PERIODIC_TASK_NAME)
        if entry:
            attributes[attr.BEAT_ENTRY] = str(entry)
        span = tracer.start_span(
            f"publish {publication.queue}",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes=attributes,
        )
        if span.get_span_context().is_valid:
            _inject(publication.message.headers, span, parent)
        return span

    def after_publish(
        self, publication: Publication, token: Any, error: BaseException | None
    ) -> None:
        if token is None:
            return
        if error is not None:
            token.record_exception(error)
            token.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            token.set_attribute(attr.ERROR_TYPE, type(error).__name__)
        token.end()

    # -- worker: the `process` span ---------------------------------------------------------------
    def _queue(self, queue: str) -> tuple[str, dict[str, Any]]:
        known = self._queues.get(queue)
        if known is None:
            if len(self._queues) > 1024:  # queues come from messages: keep the cache bounded
                self._queues.clear()
            known = self._queues[queue] = (
                f"process {queue}",
                {
                    attr.SYSTEM: self.system,
                    attr.OPERATION_TYPE: "process",
                    attr.OPERATION_NAME: "process",
                    attr.DESTINATION: queue,
                    attr.POOL: self.pool,
                },
            )
        return known

    def started(self, job: Job) -> None:
        tracer = installed_tracer()
        if tracer is None:
            return
        name, shared = self._queue(job.queue)
        # Every attribute known at the start goes in at the start: one pass of the SDK's checks.
        attributes = {
            **shared,
            attr.MESSAGE_ID: job.task_id,
            attr.TASK_NAME: job.task_name,
            attr.TASK_RETRIES: job.retries,
            attr.DELIVERY_COUNT: job.delivery_count,
        }
        if job.sent_at is not None:
            attributes[attr.QUEUE_WAIT_MS] = max(0.0, (time.time() - job.sent_at) * 1000.0)
        parent = _EMPTY  # never the worker thread's own current span
        links: list[Link] | None = None
        if "traceparent" in job.headers:
            producer_ctx = _extract(job.headers)
            producer = trace.get_current_span(producer_ctx).get_span_context()
            if producer.is_valid:
                links = [Link(producer)]
                if self.parenting == "parent":
                    parent = producer_ctx
        span = tracer.start_span(
            name, context=parent, kind=SpanKind.CONSUMER, attributes=attributes, links=links
        )
        job.span = span
        job.carrier = _carrier(span)

    def enter_task(self, job: Job) -> Any:
        """Make the job's `process` span current for the task body (its fresh context)."""
        span = job.span  # the live span when the task runs in the worker process
        if span is None:
            if not job.carrier:
                return None
            ctx = _extract(job.carrier)
        else:
            ctx = trace.set_span_in_context(span, _EMPTY)
        otel_context.attach(ctx)  # the task's context is thrown away after it: no detach
        return None

    def finished(self, job: Job, outcome: Outcome) -> None:
        span = job.span
        if span is None:
            return
        job.span = None
        state = outcome.state
        if state in FAILED_STATES:
            error_type = outcome.exc_type or str(state)
            span.set_attributes({attr.TASK_STATE: str(state), attr.ERROR_TYPE: error_type})
            span.set_status(Status(StatusCode.ERROR, f"{error_type}: {outcome.exc_message}"))
            span.add_event(
                "exception",
                _exception_attributes(error_type, outcome.exc_message, outcome.traceback),
            )
        else:
            span.set_attribute(attr.TASK_STATE, str(state))
            if state == TaskState.RETRY:
                event = _exception_attributes(
                    outcome.exc_type or "Retry", outcome.exc_message, None
                )
                event["millpond.retry.countdown"] = outcome.countdown or 0.0
                if outcome.eta is not None:
                    event["millpond.retry.eta"] = outcome.eta
                span.add_event("retry", event)
        span.end()

    def worker_stopped(self, worker: WorkerView) -> None:
        otel.shutdown()

    # -- execution processes ----------------------------------------------------------------------
    def process_exiting(self) -> None:
        """Export what a child's batch processor still holds: `os._exit` would drop it."""
        otel.flush()
