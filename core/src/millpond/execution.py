"""What happens around a task body, whatever pool runs it.

`run_job` is the only thing an execution unit calls. It runs the task in a brand-new
`contextvars.Context`, so nothing of task N (trace context, log context, request) can leak into task
N+1 on a reused thread, and a greenlet's empty context gets exactly what the task needs. Inside it
attaches the job's trace context, binds the log context, opens the `run <task>` span, calls the
function, and turns whatever happened into an `Outcome`. It never raises.
"""

from __future__ import annotations

import contextvars
import time
import traceback
from typing import TYPE_CHECKING, Any

import structlog

from millpond import telemetry
from millpond.exceptions import (
    MaxRetriesExceededError,
    Reject,
    Retry,
    UnknownTask,
)
from millpond.pool import FAILURE, REJECTED, RETRY, SUCCESS, Job, Outcome
from millpond.task import Request, _current_request

if TYPE_CHECKING:
    from millpond.app import Millpond

_app: Millpond | None = None


def set_worker_app(app: Millpond) -> None:
    """The app whose registry execution units look tasks up in (inherited by forked children)."""
    global _app
    _app = app


def worker_app() -> Millpond:
    if _app is None:
        raise RuntimeError("no worker app is set: call millpond.execution.set_worker_app(app) first")
    return _app


def run_job(job: Job) -> Outcome:
    return contextvars.Context().run(_run, job)


def _failure(exc: BaseException, started: float, tb: str | None = None) -> Outcome:
    return Outcome(
        state=FAILURE,
        exc_type=type(exc).__name__,
        exc_module=type(exc).__module__,
        exc_message=str(exc),
        traceback=tb if tb is not None else "".join(traceback.format_exception(exc)),
        runtime=time.perf_counter() - started,
    )


def _run(job: Job) -> Outcome:
    started = time.perf_counter()
    structlog.contextvars.bind_contextvars(
        task_id=job.task_id, task_name=job.task_name, retries=job.retries
    )
    try:
        task = worker_app().tasks.get(job.task_name)
        if task is None:
            raise UnknownTask(f"task {job.task_name!r} is not registered in this worker")
    except Exception as exc:
        return _failure(exc, started)
    _current_request.set(
        Request(
            id=job.task_id,
            task=job.task_name,
            args=job.args,
            kwargs=job.kwargs,
            retries=job.retries,
            queue=job.queue,
            root_id=job.root_id,
            parent_id=job.parent_id,
            origin=job.origin,
            time_limit=job.time_limit,
            soft_time_limit=job.soft_time_limit,
            delivery_count=job.delivery_count,
        )
    )
    with telemetry.run_span(job) as span:
        if span is not None:
            ids = telemetry.current_ids()
            if ids:
                structlog.contextvars.bind_contextvars(trace_id=ids[0], span_id=ids[1])
        try:
            result: Any = task(*job.args, **job.kwargs)
        except Retry as req:
            return _retry_outcome(job, task.options.max_retries, req, started)
        except Reject as rej:
            return Outcome(
                state=REJECTED,
                exc_type="Reject",
                exc_module="millpond.exceptions",
                exc_message=rej.reason,
                requeue=rej.requeue,
                runtime=time.perf_counter() - started,
            )
        except Exception as exc:
            if task.options.autoretry_for and isinstance(exc, task.options.autoretry_for):
                countdown = task.backoff(job.retries)
                return _retry_outcome(
                    job, task.options.max_retries, Retry(exc=exc, countdown=countdown), started
                )
            return _failure(exc, started)
        except SystemExit as exc:  # a task calling sys.exit() fails; it does not stop the worker
            return _failure(exc, started)
    return Outcome(state=SUCCESS, result=result, runtime=time.perf_counter() - started)


def _retry_outcome(job: Job, default_max: int | None, req: Retry, started: float) -> Outcome:
    limit = req.max_retries if req.max_retries is not None else default_max
    if limit is not None and job.retries >= limit:
        exc = req.exc or MaxRetriesExceededError(
            f"task {job.task_name}[{job.task_id}] retried {job.retries} times, its limit"
        )
        return _failure(exc, started)
    countdown = req.countdown
    if countdown is None and req.eta is None:
        task = worker_app().tasks.get(job.task_name)
        countdown = task.options.default_retry_delay if task else 180.0
    reason = req.exc
    return Outcome(
        state=RETRY,
        exc_type=type(reason).__name__ if reason else "Retry",
        exc_module=type(reason).__module__ if reason else "millpond.exceptions",
        exc_message=str(reason) if reason else str(req),
        countdown=countdown,
        eta=req.eta,
        runtime=time.perf_counter() - started,
    )
