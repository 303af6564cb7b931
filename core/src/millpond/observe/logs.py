"""Log context, a hooks implementation: a task's ids in structlog's context while it runs.

Any structlog set-up that merges contextvars (millpond's own, `millpond_cli.logs`, or the
application's) then puts `task_id`, `task_name`, `retries` and, under a span, `trace_id` and
`span_id` on every line the task logs. The binding happens in the task's own fresh context, so
nothing leaks to the next task on a reused thread or greenlet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opentelemetry import trace
from structlog.contextvars import bind_contextvars

from millpond.contracts.hooks import Hooks

if TYPE_CHECKING:
    from millpond.contracts.pool import Job


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the current span, whoever traces, or None outside one."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


class LogContextHooks(Hooks):
    """Runs after the tracing hook (`order`), so the task's `process` span is current."""

    order = 20

    def enter_task(self, job: Job) -> None:
        bind_contextvars(task_id=job.task_id, task_name=job.task_name, retries=job.retries)
        ids = current_ids()
        if ids is not None:
            bind_contextvars(trace_id=ids[0], span_id=ids[1])
