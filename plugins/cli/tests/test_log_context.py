"""`LogContextHooks`: a task's ids, and its span's, in structlog's context while it runs."""

from __future__ import annotations

import contextvars

import structlog
from opentelemetry import trace

from millpond.testing.pool_kit import make_job
from millpond_cli.logs import LogContextHooks

SPAN = trace.NonRecordingSpan(
    trace.SpanContext(
        trace_id=0xABC, span_id=0xDEF, is_remote=False, trace_flags=trace.TraceFlags(1)
    )
)


def _bound(*, under_span: bool) -> tuple[str, dict[str, object]]:
    job = make_job("add", 2, 3, retries=1)

    def run() -> dict[str, object]:
        structlog.contextvars.bind_contextvars(worker="w1")
        if under_span:
            with trace.use_span(SPAN):
                LogContextHooks().enter_task(job)
        else:
            LogContextHooks().enter_task(job)
        return structlog.contextvars.get_contextvars()

    return job.task_id, contextvars.Context().run(run)


def test_binds_the_tasks_ids_next_to_what_is_bound_already() -> None:
    task_id, bound = _bound(under_span=False)
    assert bound == {"worker": "w1", "task_id": task_id, "task_name": "kit.add", "retries": 1}


def test_binds_the_current_spans_ids_in_hex() -> None:
    _task_id, bound = _bound(under_span=True)
    assert bound["trace_id"] == f"{0xABC:032x}"
    assert bound["span_id"] == f"{0xDEF:016x}"


def test_nothing_leaks_into_the_callers_context() -> None:
    _bound(under_span=True)
    assert "task_id" not in structlog.contextvars.get_contextvars()
