"""Execute: what happens around a task body, whatever pool runs it (the `Execution` every pool is
handed, bound to one app and one hook chain; a forked child inherits both, no module global).

`Executor.run` never raises, and runs each task in a brand-new `contextvars.Context`: nothing of
task N (trace or log context, request) leaks into task N+1 on a reused thread, and a greenlet's
empty context gets what the task needs. `run_async` is the same on an event loop, so sync and async
tasks get identical retries, rejections and hooks.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import time
from typing import TYPE_CHECKING, Any

from millpond.contracts.hooks import HookChain
from millpond.contracts.pool import Guard, Job, Outcome
from millpond.exceptions import MaxRetriesExceededError, Reject, Retry, UnknownTask
from millpond.produce.task import Request, Task, _current_request
from millpond.states import TaskState

if TYPE_CHECKING:
    from millpond.produce.app import Millpond


class Executor:
    """Runs the jobs of one app in whatever execution unit calls it."""

    def __init__(self, app: Millpond, hooks: HookChain | None = None) -> None:
        # built before the pool forks: it registers the built-in tasks Celery's canvas sends
        self.canvas, self.tasks = app.canvas, app.tasks
        self.hooks = hooks = hooks if hooks is not None else app.hooks
        #: what pools call (the worker's template, children in theirs): the chain's own, no wrapper
        self.job_started, self.job_finished = hooks.started, hooks.finished
        self.process_started, self.process_exiting = hooks.process_started, hooks.process_exiting

    def is_async(self, job: Job) -> bool:
        task = self.tasks.get(job.task_name)
        return task is not None and inspect.iscoroutinefunction(task.fn)

    def run(self, job: Job) -> Outcome:
        return contextvars.Context().run(self._run, job)

    async def run_async(self, job: Job, guard: Guard | None = None) -> Outcome:
        """`run` for a running event loop, in a new asyncio task with a fresh context (concurrent
        coroutines never see each other's trace or log context). Cancelling the caller cancels it
        (the pool tells a time limit from a terminate). A plain `def` task is called inline on the
        loop (a pool that wants it off the loop checks `is_async`); `guard` wraps its coroutine."""
        loop = asyncio.get_running_loop()
        return await loop.create_task(self._run_async(job, guard), context=contextvars.Context())

    def _run(self, job: Job) -> Outcome:
        started = time.perf_counter()
        task = self.tasks.get(job.task_name)
        if task is None or inspect.iscoroutinefunction(task.fn):
            return _refused(job, task, started)
        request, tokens = self._begin(job)
        try:
            result: Any = task(*job.args, **job.kwargs)
            if inspect.iscoroutine(result):  # a plain def that returned a coroutine
                result.close()
                outcome = _refused(job, task, started)
            else:
                outcome = Outcome(TaskState.SUCCESS, result, runtime=time.perf_counter() - started)
        except (Exception, SystemExit) as exc:
            outcome = _outcome_of(job, task, exc, started)
        return self._end(job, request, tokens, outcome)

    async def _run_async(self, job: Job, guard: Guard | None) -> Outcome:
        started = time.perf_counter()
        task = self.tasks.get(job.task_name)
        if task is None:
            return _refused(job, task, started)
        request, tokens = self._begin(job)
        try:
            result: Any = task(*job.args, **job.kwargs)
            if inspect.iscoroutine(result):
                result = await (guard(result) if guard is not None else result)
            outcome = Outcome(TaskState.SUCCESS, result, runtime=time.perf_counter() - started)
        except (Exception, SystemExit) as exc:
            outcome = _outcome_of(job, task, exc, started)
        return self._end(job, request, tokens, outcome)

    def _begin(self, job: Job) -> tuple[Request, Any]:
        """The task's `self.request`, set in the fresh context, then the `enter_task` hooks."""
        _current_request.set(request := Request(job))
        return request, self.hooks.enter_task(job)

    def _end(self, job: Job, request: Request, tokens: Any, outcome: Outcome) -> Outcome:
        self.hooks.exit_task(job, tokens, outcome)
        outcome.children = request.children
        if outcome.state == TaskState.FAILURE and request.errbacks:
            self.canvas.inline_errbacks(request, outcome)
        return outcome


def _refused(job: Job, task: Task[..., Any] | None, started: float) -> Outcome:
    """A task this unit cannot run: not registered here, or `async def` in a sync pool."""
    if task is None:
        exc: Exception = UnknownTask(f"task {job.task_name!r} is not registered in this worker")
    else:
        exc = TypeError(
            f"task {job.task_name} is async def: run it with the asyncio pool "
            "(pip install millpond-pool-asyncio, then --pool asyncio), or make it a plain def"
        )
    return Outcome.of(exc, runtime=time.perf_counter() - started)


def _outcome_of(job: Job, task: Task[..., Any], exc: BaseException, started: float) -> Outcome:
    """What an exception out of the task body means: a retry, a rejection, or a failure (a task
    calling sys.exit() fails too, not the worker)."""
    retried = isinstance(exc, Exception) and not isinstance(exc, Retry | Reject)
    if retried and isinstance(exc, task.options.autoretry_for):
        exc = Retry(exc=exc, countdown=task.backoff(job.retries))
    runtime = time.perf_counter() - started
    if isinstance(exc, Reject):
        return Outcome.of(exc, TaskState.REJECTED, requeue=exc.requeue, runtime=runtime)
    if not isinstance(exc, Retry):
        return Outcome.of(exc, runtime=runtime)
    limit = exc.max_retries if exc.max_retries is not None else task.options.max_retries
    if limit is not None and job.retries >= limit:
        why = f"task {job.task_name}[{job.task_id}] retried {job.retries} times, its limit"
        return Outcome.of(exc.exc or MaxRetriesExceededError(why), runtime=runtime)
    outcome = Outcome.of(exc.exc or exc, TaskState.RETRY, runtime=runtime)
    outcome.countdown, outcome.eta = exc.countdown, exc.eta
    if exc.countdown is None and exc.eta is None:
        outcome.countdown = task.options.default_retry_delay
    return outcome
