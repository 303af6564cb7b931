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

When `observability.configure_tracing` set tracing up from the `OTEL_*` variables with the
OTLP/HTTP exporter, it also installs a `SpanRecorder` (`use_recorder`): `process` and `run` spans
are then `RecordedSpan`s, about a seventh of the SDK's cost (see `millpond.span_recorder`); every
other span, and every other set-up, goes through the SDK.
"""

from __future__ import annotations

import time
import traceback as _traceback
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import Context, ContextVar, copy_context
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from millpond import otlp_wire, span_recorder
from millpond.exceptions import Retry
from millpond.span_names import (
    DELIVERY_COUNT,
    DESTINATION,
    ERROR_TYPE,
    MESSAGE_ID,
    OPERATION_NAME,
    OPERATION_TYPE,
    POOL,
    QUEUE_WAIT_MS,
    SYSTEM,
    TASK_NAME,
    TASK_RETRIES,
    TASK_STATE,
)
from millpond.span_recorder import (
    NO_SPAN,
    NO_TRACE,
    SAMPLED_DIGITS,
    TRACEPARENT_00,
    RecordedSpan,
    SpanRecorder,
    new_trace_hex,
    parse_traceparent,
)

if TYPE_CHECKING:
    from millpond.pool import Job, Outcome

TRACING = False
#: "parent": `process` is a child of `publish` (one trace); "link": a new trace, linked to it
PROCESS_PARENTING = "parent"
#: `messaging.system` of spans made without a broker at hand (the worker sets its broker's)
MESSAGING_SYSTEM = "millpond"

__all__ = [
    "DELIVERY_COUNT",
    "DESTINATION",
    "ERROR_TYPE",
    "MESSAGE_ID",
    "OPERATION_NAME",
    "OPERATION_TYPE",
    "POOL",
    "QUEUE_WAIT_MS",
    "SYSTEM",
    "TASK_NAME",
    "TASK_RETRIES",
    "TASK_STATE",
]
otlp_wire.REPEATING_KEYS.update((TASK_STATE, ERROR_TYPE, "exception.type", "exception.escaped"))

#: outcome states that make the `process` span an error
_ERROR_STATES = frozenset({"FAILURE", "LOST", "TIMEOUT"})
#: states decided by the pool (the `run` span may never have ended): record the exception here
_POOL_DECIDED = frozenset({"LOST", "TIMEOUT"})

_propagator = TraceContextTextMapPropagator()
_EMPTY = otel_context.Context()
_tracer: trace.Tracer | None = None
_process_base: dict[tuple[str, str, str], dict[str, Any]] = {}
_recorder: SpanRecorder | None = None
#: pre-encoded attributes shared by recorded `process` spans, by (queue, task name, pool);
#: `refresh` empties it, so a change of messaging system is never served stale
_process_wire: dict[tuple[str, str, str], tuple[bytes, str]] = {}
#: pre-encoded attributes of recorded `run` spans, by task name
_run_wire: dict[str, tuple[bytes, str]] = {}
_WIRE_CACHE = 4096


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
    _process_wire.clear()
    _configure_native()
    return TRACING


def use_recorder(recorder: SpanRecorder | None) -> None:
    """Record `process` and `run` spans with `recorder` (None: through the SDK's tracer)."""
    global _recorder
    _recorder = recorder
    _process_wire.clear()
    _run_wire.clear()
    _configure_native()


def recorder() -> SpanRecorder | None:
    return _recorder


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


_TRACEPARENT_00 = TRACEPARENT_00  # the common case; anything else goes to the propagator
_fullmatch_00 = TRACEPARENT_00.fullmatch


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


def _start_sdk_process_span(job: Job, pool_name: str) -> None:
    """`start_process_span` through the SDK's tracer (no span recorder installed)."""
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


def _producer_ids(traceparent: str) -> tuple[str, str, bool] | None:
    """The producer's (trace id hex, span id hex, sampled), whatever traceparent version it sent."""
    ids = parse_traceparent(traceparent)
    if ids is None and not TRACEPARENT_00.fullmatch(traceparent):  # another version: the rules
        span_ctx = _remote_span_context(traceparent, None)
        if span_ctx is not None:
            ids = (
                f"{span_ctx.trace_id:032x}",
                f"{span_ctx.span_id:016x}",
                span_ctx.trace_flags.sampled,
            )
    return ids


def _start_process_span(job: Job, pool_name: str) -> None:
    """Open the CONSUMER span for a job and put its context on the job for the `run` span.

    The producer's context is extracted once, here; the queue wait (from the `millpond_sent_at`
    header) is an attribute at span start, so samplers and tail-based collectors see it.

    With the span recorder, only what the task's own path needs happens here (ids, the sampling
    decision, the start time); the attributes are encoded by the recorder's thread when the span
    is exported. The usual producer header (version 00, valid) is read in place; any other goes
    to the rules.
    """
    recorder = _recorder
    if recorder is None:
        _start_sdk_process_span(job, pool_name)
        return
    key = (job.queue, job.task_name, pool_name)
    cached = _process_wire.get(key)
    if cached is None:
        cached = _process_shape(key)
    traceparent = job.producer_traceparent
    producer: tuple[str, str, bool] | None = None
    if traceparent:
        if _fullmatch_00(traceparent) is not None:
            producer_trace, producer_span = traceparent[3:35], traceparent[36:52]
            if producer_trace != NO_TRACE and producer_span != NO_SPAN:
                producer = producer_trace, producer_span, traceparent[54] in SAMPLED_DIGITS
        else:
            producer = _producer_ids(traceparent)
    state: trace.TraceState | None = None
    link_from: tuple[str, str, str | None] | None = None
    if producer is None:
        trace_hex, parent_hex = new_trace_hex(), ""
        sampled = recorder.sample(None, trace_hex)
    else:
        producer_state = job.producer_tracestate or None
        link_from = (producer[0], producer[1], producer_state)
        if PROCESS_PARENTING == "parent":
            trace_hex, parent_hex = producer[0], producer[1]
            sampled = (
                producer[2] if recorder.follows_parent else recorder.sample(producer[2], trace_hex)
            )
            if producer_state:
                state = trace.TraceState.from_header([producer_state])
        else:
            trace_hex, parent_hex = new_trace_hex(), ""
            sampled = recorder.sample(None, trace_hex)
    span = RecordedSpan(
        recorder if sampled else None,
        trace_hex,
        parent_hex,
        cached[1],
        otlp_wire.KIND_CONSUMER,
        cached[0],
        (job.task_id, job.retries, job.delivery_count, job.sent_at),
        bool(parent_hex),
        state,
        link_from,
    )
    job.span = span
    job.traceparent = f"00-{trace_hex}-{span.span_hex}-{'01' if sampled else '00'}"
    job.tracestate = job.producer_tracestate if state is not None else None


def _process_shape(key: tuple[str, str, str]) -> tuple[bytes, str]:
    """The encoded attributes every recorded `process` span of (queue, task, pool) shares."""
    if len(_process_wire) >= _WIRE_CACHE:
        _process_wire.clear()
    queue, task_name, pool_name = key
    attrs = dict(_base_attributes(queue, pool_name))
    attrs[TASK_NAME] = task_name
    shape = _process_wire[key] = (otlp_wire.span_attributes(attrs), f"process {queue}")
    return shape


def _end_process_span(job: Job, outcome: Outcome) -> None:
    """Close the job's `process` span with its outcome (state, error status, retry event)."""
    span = job.span
    if span is None:
        return
    job.span = None
    state = outcome.state
    if isinstance(span, RecordedSpan):
        if state == "SUCCESS":  # the common case: nothing else to note
            span.state = state
            span.end()
            return
        span.state = state
    else:
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
_NOT_TRACED: AbstractContextManager[None] = nullcontext(None)


def run_span(job: Job, *, fresh_context: bool = False) -> AbstractContextManager[trace.Span | None]:
    """The `run <task>` span inside the execution unit, child of the job's `process` span.

    In the worker process the live `process` span object is the parent (no parsing); in a child
    process or after pickling, its context comes from `job.traceparent`. The span is current for
    the task body (user spans and log lines see it). Entered once per task: with tracing off it is
    a shared do-nothing context manager.

    `fresh_context`: the caller runs in a `contextvars.Context` of its own that is thrown away
    after the task (`millpond.execution` does), so the span is made current without a way back;
    otherwise the previous context is restored on exit.
    """
    if not TRACING or not job.traceparent:
        return _NOT_TRACED
    if _recorder is None:
        return _sdk_run_span(job)
    span = _recorded_run_span(job, _recorder)
    if span is None:
        return _NOT_TRACED
    if fresh_context:
        _make_current(span)
        return span  # RecordedSpan.__exit__ records an escaping exception and ends it
    return _current_until_exit(span)


@contextmanager
def _sdk_run_span(job: Job) -> Iterator[trace.Span | None]:
    process = job.span
    if process is None:
        parent_ctx = _remote_span_context(job.traceparent or "", job.tracestate)
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


@contextmanager
def _current_until_exit(span: RecordedSpan) -> Iterator[trace.Span | None]:
    token = otel_context.attach(trace.set_span_in_context(span, _EMPTY))
    try:
        with span:
            yield span
    finally:
        otel_context.detach(token)


def _recorded_run_span(job: Job, recorder: SpanRecorder) -> RecordedSpan | None:
    """The recorded `run` span of a job; an unsampled job gets its `process` span back.

    Not sampled: nothing will be exported, the task body only needs the trace's context (its own
    spans then stay unsampled too), and the unsampled `process` span carries it (ending it again
    does nothing).
    """
    process = job.span
    state: trace.TraceState | None
    run_recorder: SpanRecorder | None
    if isinstance(process, RecordedSpan):  # same process: no parsing
        if process.recorder is None:
            return process
        trace_hex, parent_hex, state = process.trace_hex, process.span_hex, process.trace_state
        run_recorder = process.recorder
    else:
        parent = parse_traceparent(job.traceparent or "")
        if parent is None:
            return None
        trace_hex, parent_hex = parent[0], parent[1]
        run_recorder = recorder if parent[2] else None
        state = trace.TraceState.from_header([job.tracestate]) if job.tracestate else None
    task_name = job.task_name
    cached = _run_wire.get(task_name)
    if cached is None:
        if len(_run_wire) >= _WIRE_CACHE:
            _run_wire.clear()
        cached = _run_wire[task_name] = (
            otlp_wire.span_attributes({TASK_NAME: task_name}),
            f"run {task_name}",
        )
    return RecordedSpan(
        run_recorder,
        trace_hex,
        parent_hex,
        cached[1],
        otlp_wire.KIND_INTERNAL,
        cached[0],
        (job.task_id, job.retries, 0, None),
        False,
        state,
    )


def _otel_context_variable() -> tuple[ContextVar[otel_context.Context], str] | None:
    """OpenTelemetry's current-context variable and its span key, or None; run it in a scratch
    context. Found and checked through the public API (attach, get_current_span)."""
    probe = trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)
    probe_context = trace.set_span_in_context(probe, _EMPTY)
    if len(probe_context) != 1:
        return None
    (key,) = probe_context
    otel_context.attach(probe_context)
    current = copy_context()
    holding = [var for var in current if current[var] is probe_context]
    if len(holding) != 1:
        return None
    (variable,) = holding
    check = trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)
    variable.set(otel_context.Context({key: check}))
    if trace.get_current_span() is not check:
        return None
    return variable, key


def _current_setter(
    found: tuple[ContextVar[otel_context.Context], str] | None,
) -> Callable[[trace.Span], object]:
    """A function making a span current for the rest of the running contextvars.Context.

    Same effect as `otel_context.attach(trace.set_span_in_context(span))` with the token
    dropped, for a caller whose context is thrown away afterwards: one variable set instead of
    a context copy and two calls through the runtime context. Falls back to `attach` should
    OpenTelemetry ever keep its context differently (`OTEL_PYTHON_CONTEXT`).
    """
    if found is None:

        def attach(span: trace.Span) -> object:
            return otel_context.attach(trace.set_span_in_context(span, _EMPTY))

        return attach
    set_variable, key = found[0].set, found[1]
    new_context = otel_context.Context

    def make_current(span: trace.Span) -> object:
        return set_variable(new_context({key: span}))

    return make_current


_OTEL_CONTEXT_VARIABLE = Context().run(_otel_context_variable)
_make_current = _current_setter(_OTEL_CONTEXT_VARIABLE)


def _enter_run_span(job: Job) -> AbstractContextManager[trace.Span | None]:
    """`run_span(job, fresh_context=True)`, a recorded span's ids bound in the log context."""
    if not TRACING or not job.traceparent:
        return _NOT_TRACED
    manager = run_span(job, fresh_context=True)
    if isinstance(manager, RecordedSpan):
        _log_id_binder()(manager.trace_hex, manager.span_hex)
    return manager


_bind_log_ids: Callable[[str, str], None] | None = None


def _log_id_binder() -> Callable[[str, str], None]:
    """Binds a span's ids in structlog's context (`millpond.logs` imports this module: lazily)."""
    global _bind_log_ids
    if _bind_log_ids is None:
        from millpond import logs

        _bind_log_ids = logs.context_binder("trace_id", "span_id")
    return _bind_log_ids


#: the job's process span, opened (the pool calls it before `on_apply`)
start_process_span: Callable[[Job, str], None] = _start_process_span
#: the job's process span, ended with its outcome (the pool calls it when the job completes)
end_process_span: Callable[[Job, Outcome], None] = _end_process_span
#: the `run` span around a task body, for a caller with a throwaway contextvars.Context (what
#: `millpond.execution` does): current, and when recorded, its ids are in the log context
enter_run_span: Callable[[Job], AbstractContextManager[trace.Span | None]] = _enter_run_span


def _configure_native() -> None:
    """Point the C part (`millpond._spancore`) at the current recorder and settings.

    Its functions do the common case of each step and call the Python ones above for the rest,
    so this only decides whether they are used: with the span recorder, not with the SDK.
    """
    global start_process_span, end_process_span, enter_run_span
    native = span_recorder.native_module()
    recorder = _recorder
    if native is None or recorder is None:
        start_process_span, end_process_span = _start_process_span, _end_process_span
        enter_run_span = _enter_run_span
        return
    from millpond import logs

    found = _OTEL_CONTEXT_VARIABLE
    native.configure(
        span_type=RecordedSpan,
        recorder=recorder,
        process_shapes=_process_wire,
        run_shapes=_run_wire,
        sampler=recorder.sample,
        follows_parent=recorder.follows_parent,
        link_only=PROCESS_PARENTING == "link",
        otel_variable=found[0] if found else None,
        otel_key=found[1] if found else None,
        otel_context=otel_context.Context,
        log_variables=logs.context_variables("trace_id", "span_id"),
        module_dict=globals(),
        not_traced=_NOT_TRACED,
        start_fallback=_start_process_span,
        run_fallback=_enter_run_span,
        end_fallback=_end_process_span,
    )
    start_process_span = native.start_process_span
    end_process_span = native.end_process_span
    enter_run_span = native.enter_run_span


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


def span_ids(span: trace.Span) -> tuple[str, str] | None:
    """(trace_id, span_id) of `span` as hex, for log lines."""
    if isinstance(span, RecordedSpan):
        return span.trace_hex, span.span_hex
    span_ctx = span.get_span_context()
    if not span_ctx.is_valid:
        return None
    return format(span_ctx.trace_id, "032x"), format(span_ctx.span_id, "016x")


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span as hex, for log lines; None when not tracing."""
    span_ctx = trace.get_current_span().get_span_context()
    if not span_ctx.is_valid:
        return None
    return format(span_ctx.trace_id, "032x"), format(span_ctx.span_id, "016x")
