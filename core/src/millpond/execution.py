"""What happens around a task body, whatever pool runs it.

`run_job` is the only thing an execution unit calls. It runs the task in a brand-new
`contextvars.Context`, so nothing of task N (trace context, log context, request) can leak into task
N+1 on a reused thread, and a greenlet's empty context gets exactly what the task needs. Inside it
attaches the job's trace context, binds the log context, opens the `run <task>` span, calls the
function, and turns whatever happened into an `Outcome`. It never raises.

`run_job_async` is the same for an event loop (the asyncio pool): the task's coroutine runs in its
own asyncio task created with a fresh context, and is awaited instead of called. Both share every
step but the call itself (`_begin`, `_outcome_of`, `_success`), so a sync and an async task get
identical retries, rejections, spans and log context.
"""

from __future__ import annotations

import contextvars
import inspect
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from millpond import logs, telemetry
from millpond.exceptions import (
    MaxRetriesExceededError,
    Reject,
    Retry,
    UnknownTask,
)
from millpond.pool import FAILURE, REJECTED, RETRY, SUCCESS, Job, Outcome
from millpond.span_recorder import RecordedSpan
from millpond.task import Request, Task, _current_request

if TYPE_CHECKING:
    from millpond.app import Millpond

#: wraps an async task's coroutine before it is awaited (the asyncio pool's soft time limit)
Guard = Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]]

_app: Millpond | None = None
_bind_task_ids = logs.context_binder("task_id", "task_name", "retries")
_bind_span_ids = logs.context_binder("trace_id", "span_id")


def set_worker_app(app: Millpond) -> None:
    """The app whose registry execution units look tasks up in (inherited by forked children)."""
    global _app
    _app = app


def worker_app() -> Millpond:
    if _app is None:
        raise RuntimeError(
            "no worker app is set: call millpond.execution.set_worker_app(app) first"
        )
    return _app


def is_async(task: Task) -> bool:
    """Whether the task's function is `async def` (calling it returns a coroutine, not a result)."""
    return inspect.iscoroutinefunction(task.fn)


def is_async_job(job: Job) -> bool:
    """Whether the job's task is `async def`; False for an unknown task (run_job reports that)."""
    task = worker_app().tasks.get(job.task_name)
    return task is not None and is_async(task)


def run_job(job: Job) -> Outcome:
    return contextvars.Context().run(_run, job)


async def run_job_async(job: Job, guard: Guard | None = None) -> Outcome:
    """`run_job` for a running event loop: an `async def` task is awaited, never called blindly.

    The task runs in a new asyncio task created with a fresh `contextvars.Context`, so concurrent
    coroutines never see each other's trace or log context. Cancelling the caller cancels the task
    (the CancelledError propagates: the pool decides whether that was a time limit or a terminate).
    A plain `def` task is called inline on the loop; a pool that wants it off the loop checks
    `is_async_job` first. `guard`, if given, wraps the task's coroutine before it is awaited.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    return await loop.create_task(_run_async(job, guard), context=contextvars.Context())


def _failure(exc: BaseException, started: float, tb: str | None = None) -> Outcome:
    return Outcome(
        state=FAILURE,
        exc_type=type(exc).__name__,
        exc_module=type(exc).__module__,
        exc_message=str(exc),
        traceback=tb if tb is not None else "".join(traceback.format_exception(exc)),
        runtime=time.perf_counter() - started,
    )


def _success(result: Any, started: float) -> Outcome:
    return Outcome(state=SUCCESS, result=result, runtime=time.perf_counter() - started)


def _begin(job: Job, started: float) -> Task | Outcome:
    """Bind the log context and the request, and find the task (or the failure to report)."""
    _bind_task_ids(job.task_id, job.task_name, job.retries)
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
    return task


def _bind_sdk_span_ids(span: Any) -> None:
    """Put an SDK `run` span's ids in the task's log context (the pool contract asks for them
    there, so a logging set-up of the user's own, reading only the context, has them too).

    A recorded span comes out of `telemetry.enter_run_span` with its ids bound already."""
    ids = telemetry.span_ids(span)
    if ids:
        _bind_span_ids(*ids)


def _async_in_sync_pool(job: Job, started: float) -> Outcome:
    return _failure(
        TypeError(
            f"task {job.task_name} is async def: run it with the asyncio pool "
            "(pip install millpond-pool-asyncio, then --pool asyncio), or make it a plain def"
        ),
        started,
        tb="",
    )


def _run(job: Job) -> Outcome:
    started = time.perf_counter()
    task = _begin(job, started)
    if isinstance(task, Outcome):
        return task
    if is_async(task):
        return _async_in_sync_pool(job, started)
    with telemetry.enter_run_span(job) as span:
        if span is not None and span.__class__ is not RecordedSpan:  # recorded: bound already
            _bind_sdk_span_ids(span)
        try:
            result: Any = task(*job.args, **job.kwargs)
        except (Exception, SystemExit) as exc:
            return telemetry.traced(span, _outcome_of(job, task, exc, started), exc)
    if inspect.iscoroutine(result):  # a plain def that returned a coroutine (a wrapped async def)
        result.close()
        return _async_in_sync_pool(job, started)
    return _success(result, started)


async def _run_async(job: Job, guard: Guard | None) -> Outcome:
    started = time.perf_counter()
    task = _begin(job, started)
    if isinstance(task, Outcome):
        return task
    with telemetry.enter_run_span(job) as span:
        if span is not None and span.__class__ is not RecordedSpan:  # recorded: bound already
            _bind_sdk_span_ids(span)
        try:
            result: Any = task(*job.args, **job.kwargs)
            if inspect.iscoroutine(result):
                result = await (guard(result) if guard is not None else result)
        except (Exception, SystemExit) as exc:
            return telemetry.traced(span, _outcome_of(job, task, exc, started), exc)
    return _success(result, started)


def _outcome_of(job: Job, task: Task, exc: BaseException, started: float) -> Outcome:
    """What an exception out of the task body means: a retry, a rejection, or a failure."""
    if isinstance(exc, Retry):
        return _retry_outcome(job, task.options.max_retries, exc, started)
    if isinstance(exc, Reject):
        return Outcome(
            state=REJECTED,
            exc_type="Reject",
            exc_module="millpond.exceptions",
            exc_message=exc.reason,
            requeue=exc.requeue,
            runtime=time.perf_counter() - started,
        )
    autoretry = task.options.autoretry_for
    if autoretry and isinstance(exc, Exception) and isinstance(exc, autoretry):
        countdown = task.backoff(job.retries)
        return _retry_outcome(
            job, task.options.max_retries, Retry(exc=exc, countdown=countdown), started
        )
    # anything else fails the task; a task calling sys.exit() fails too, it does not stop the worker
    return _failure(exc, started)


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
