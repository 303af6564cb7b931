"""Span details checked in-process (memory:// broker, the session's in-memory span exporter):
exception and retry events with their attributes, pool-decided failures, sampling decisions
carried from the producer, tracestate, and a provider found only when spans are made."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from millpond import Millpond
from millpond.contracts.pool import Job, Outcome
from millpond.exceptions import WorkerLostError
from millpond.states import TaskState
from millpond.testing.fixtures import unique
from millpond.wire.protocol import encode_task
from millpond_tracing.hooks import TracingHooks
from tests.observability.conftest import clean_env, run_python


@pytest.fixture
def app() -> Iterator[Millpond]:
    name = unique("obs")
    application = Millpond(
        "obs-spans", broker_url=f"memory://{name}", default_queue=name, queues=[name]
    )
    calls: dict[str, int] = {}

    @application.task(name="obs.ok")
    def ok(x: int) -> int:
        return x

    @application.task(name="obs.broken")
    def broken() -> None:
        raise KeyError("missing-thing")

    @application.task(
        name="obs.flaky", autoretry_for=(ConnectionError,), max_retries=1, retry_backoff=0.01
    )
    def flaky() -> str:
        calls["flaky"] = calls.get("flaky", 0) + 1
        if calls["flaky"] == 1:
            raise ConnectionError("db away")
        return "ok"

    yield application
    application.close()


def _spans(exporter: Any, task_id: str, count: int, timeout: float = 10) -> list[Any]:
    """The finished spans about message `task_id`, once there are `count` of them."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            s
            for s in exporter.get_finished_spans()
            if s.attributes.get("messaging.message.id") == task_id
        ]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(
                f"expected {count} spans for {task_id}, got {[s.name for s in found]}"
            )
        time.sleep(0.01)


def _named(spans: list[Any], prefix: str) -> list[Any]:
    return sorted((s for s in spans if s.name.startswith(prefix)), key=lambda s: s.start_time)


def test_failure_records_the_exception_on_the_process_span(
    app: Millpond, start_worker: Any, span_exporter: Any
) -> None:
    start_worker(app, pool="solo")
    result = app.tasks["obs.broken"].delay()
    with pytest.raises(KeyError):
        result.get(timeout=10)
    spans = _spans(span_exporter, result.id, 2)
    (process,) = _named(spans, "process ")
    (publish,) = _named(spans, "publish ")
    assert publish.attributes["messaging.system"] == "memory"  # the producer's broker
    assert publish.kind == SpanKind.PRODUCER
    assert process.attributes["messaging.system"] == "memory"
    assert process.kind == SpanKind.CONSUMER
    assert process.status.status_code == StatusCode.ERROR
    assert process.status.description == "KeyError: 'missing-thing'"
    assert process.attributes["error.type"] == "KeyError"
    assert process.attributes["millpond.task.state"] == "FAILURE"
    (event,) = [e for e in process.events if e.name == "exception"]
    assert event.attributes["exception.type"] == "KeyError"
    assert "missing-thing" in event.attributes["exception.message"]
    assert "raise KeyError" in event.attributes["exception.stacktrace"]


def test_autoretry_is_an_event_and_a_new_publish(
    app: Millpond, start_worker: Any, span_exporter: Any
) -> None:
    start_worker(app, pool="solo")
    result = app.tasks["obs.flaky"].delay()
    assert result.get(timeout=10) == "ok"
    spans = _spans(span_exporter, result.id, 4)
    processes, publishes = _named(spans, "process "), _named(spans, "publish ")
    assert len(processes) == len(publishes) == 2
    retry = next(e for e in processes[0].events if e.name == "retry")
    assert retry.attributes["exception.type"] == "ConnectionError"
    assert retry.attributes["exception.message"] == "db away"
    assert retry.attributes["millpond.retry.countdown"] >= 0
    assert processes[0].status.status_code == StatusCode.UNSET  # retrying is not failing
    assert processes[0].attributes["millpond.task.state"] == "RETRY"
    assert publishes[1].parent is not None
    assert publishes[1].parent.span_id == processes[0].context.span_id
    assert publishes[1].attributes["millpond.task.retries"] == 1
    assert processes[1].parent.span_id == publishes[1].context.span_id


def test_the_producers_sampling_decision_is_kept(
    app: Millpond, start_worker: Any, span_exporter: Any
) -> None:
    """A producer that sampled its trace out (flags 00): the worker records nothing of it,
    and a tracestate entry travels on into the worker's spans."""
    start_worker(app, pool="solo")
    queue = app.settings.default_queue
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    unsampled = encode_task("obs.ok", (1,), {})
    unsampled.headers["traceparent"] = f"00-{trace_id}-00f067aa0ba902b7-00"
    sampled = encode_task("obs.ok", (2,), {})
    sampled.headers["traceparent"] = f"00-{trace_id}-00f067aa0ba902b8-01"
    sampled.headers["tracestate"] = "vendor=abc"
    app.broker.publish(queue, unsampled)
    app.broker.publish(queue, sampled)
    assert app.AsyncResult(unsampled.headers["id"]).get(timeout=10) == 1
    assert app.AsyncResult(sampled.headers["id"]).get(timeout=10) == 2
    spans = _spans(span_exporter, sampled.headers["id"], 1)
    assert not [
        s
        for s in span_exporter.get_finished_spans()
        if s.attributes.get("messaging.message.id") == unsampled.headers["id"]
    ]
    (process,) = _named(spans, "process ")
    assert format(process.context.trace_id, "032x") == trace_id
    assert process.parent.span_id == 0x00F067AA0BA902B8
    assert process.context.trace_state.get("vendor") == "abc"


def test_garbage_traceparent_starts_a_fresh_trace(
    app: Millpond, start_worker: Any, span_exporter: Any
) -> None:
    start_worker(app, pool="solo")
    message = encode_task("obs.ok", (3,), {})
    message.headers["traceparent"] = "not-a-traceparent"
    app.broker.publish(app.settings.default_queue, message)
    assert app.AsyncResult(message.headers["id"]).get(timeout=10) == 3
    (process,) = _named(_spans(span_exporter, message.headers["id"], 1), "process ")
    assert process.parent is None
    assert not process.links


def test_lost_job_records_the_pool_error_on_the_process_span(span_exporter: Any) -> None:
    """LOST / TIMEOUT are decided by the pool (a killed child reports nothing): the `process`
    span carries the error and the exception event from the pool's outcome."""
    span_exporter.clear()
    hooks = TracingHooks()
    job = Job(task_id=unique("lost"), task_name="obs.lost", args=(), kwargs={}, queue="q")
    hooks.started(job)
    assert job.carrier is not None
    assert job.carrier["traceparent"].startswith("00-")
    lost = WorkerLostError("child 123 killed by SIGKILL")
    hooks.finished(job, Outcome.of(lost, TaskState.LOST))
    (span,) = [
        s
        for s in span_exporter.get_finished_spans()
        if s.attributes.get("messaging.message.id") == job.task_id
    ]
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "WorkerLostError"
    assert span.attributes["millpond.task.state"] == TaskState.LOST
    (event,) = span.events
    assert event.name == "exception"
    assert event.attributes["exception.message"] == "child 123 killed by SIGKILL"
    assert job.span is None


def test_process_span_never_inherits_the_worker_threads_context(span_exporter: Any) -> None:
    """A message without trace context starts a new trace even if the calling thread has a
    current span (an embedding application's)."""
    hooks = TracingHooks()
    job = Job(task_id=unique("ctx"), task_name="obs.ctx", args=(), kwargs={}, queue="q")
    with trace.get_tracer("embedding-app").start_as_current_span("app span") as outer:
        hooks.started(job)
    span = job.span
    hooks.finished(job, Outcome(state=TaskState.SUCCESS))
    assert span.parent is None
    assert span.context.trace_id != outer.get_span_context().trace_id


_LATE_PROVIDER = r"""
import json
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from millpond import Millpond

app = Millpond("late", broker_url="memory://late", default_queue="late")

@app.task(name="late.ok")
def ok() -> None:
    pass

before = ok.delay()
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
after = ok.delay()
consumer = app.broker.consumer(["late"], 10)
headers = {d.message.headers["id"]: d.message.headers for d in consumer.fetch(10, 1.0)}
print(json.dumps({
    "before": "traceparent" in headers[before.id],
    "after": "traceparent" in headers[after.id],
    "spans": [s.name for s in exporter.get_finished_spans()],
}))
"""


def test_a_provider_installed_later_is_found_when_spans_are_made() -> None:
    """No provider: no span and no header. The app installs one afterwards (as a web app's
    start-up would): the next publish has its span and carries its context."""
    got = run_python(_LATE_PROVIDER, clean_env())
    assert got == {"before": False, "after": True, "spans": ["publish late"]}
