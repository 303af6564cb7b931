"""The execution-pool contract (docs/writing-a-pool.md walks through writing one).

A pool runs each `Job` in its execution unit (the calling thread, a thread, a child process, a
greenlet) through `self.execution.run(job)`, which owns everything around the task body (fresh
context, hooks, exception capture, retries) and never raises; so a pool only moves jobs and
outcomes, reporting each end with `self.complete(job, outcome)` from any thread. The worker's loop,
woken at once, does the ack, the result store and any retry.
"""

from __future__ import annotations

import json
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from traceback import format_exception
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias, final

from millpond.exceptions import NotSupported, TaskRevokedError, TimeLimitExceeded
from millpond.states import TaskState

# the decoded message is the job a pool runs; re-exported: this is where the contract names it
from millpond.wire.protocol import Job as Job  # noqa: PLC0414

if TYPE_CHECKING:
    from millpond.consume.execute import Executor


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a pool can honestly do; the worker refuses or warns about anything else."""

    soft_time_limit: bool = False
    hard_time_limit: bool = False
    terminate_job: bool = False
    resize: bool = False
    #: False for pools that run one job at a time in the consumer loop's own thread (solo)
    concurrent: bool = True


def _json_safe(arg: Any) -> Any:
    """An exception's arg as it is if JSON encodes it, else its repr (as Celery stores them)."""
    try:
        json.dumps(arg)
    except (TypeError, ValueError):
        return repr(arg)
    return arg


@dataclass(slots=True)
class Outcome:
    """How a job ended; picklable, so it crosses process boundaries."""

    state: TaskState
    result: Any = None
    exc_type: str | None = None
    exc_module: str | None = None
    exc_message: str = ""
    #: the exception's args, JSON-safe: the result store keeps these, as Celery does, so an
    #: exception is rebuilt as `cls(*args)` the way it was raised (None: `[exc_message]`)
    exc_args: list[Any] | None = None
    traceback: str | None = None
    countdown: float | None = None  # RETRY: seconds from now
    eta: float | None = None  # RETRY: seconds since the epoch (wins over countdown)
    requeue: bool = False  # REJECTED / LOST: put the message back instead of dead-lettering
    runtime: float = 0.0
    #: what the task sent while it ran (Celery's `as_tuple` form), stored as its `children`
    children: list[Any] = field(default_factory=list)

    @property
    def stored_args(self) -> list[Any]:
        """What the result store keeps as `exc_message`: the exception's args."""
        if self.exc_args is not None:
            return list(self.exc_args)
        return [self.exc_message] if self.exc_message else []

    @classmethod
    def of(
        cls,
        exc: BaseException,
        state: TaskState = TaskState.FAILURE,
        *,
        message: str | None = None,
        requeue: bool = False,
        runtime: float = 0.0,
    ) -> Outcome:
        """How `exc` ended a job (a FAILURE unless `state` says otherwise), with the traceback where
        it was raised; `message` replaces its text when the pool adds what it was doing."""
        return cls(
            state=state,
            exc_type=type(exc).__name__,
            exc_module=type(exc).__module__,
            exc_message=str(exc) if message is None else message,
            exc_args=[_json_safe(arg) for arg in exc.args] if message is None else None,
            traceback="".join(format_exception(exc)) if exc.__traceback__ else None,
            requeue=requeue,
            runtime=runtime,
        )

    @classmethod
    def hard_timeout(cls, job: Job, how: str, where: BaseException | None = None) -> Outcome:
        """The TIMEOUT of a job its pool stopped at its hard time limit, worded alike in every
        pool; `where` lends its traceback (the timer that fired, for a green pool)."""
        limit = f"{job.time_limit or 0:g}s"
        exc = TimeLimitExceeded(
            f"task {job.task_name}[{job.task_id}] ran past its hard time limit of {limit} and {how}"
        )
        return cls.of(exc.with_traceback(where.__traceback__) if where else exc, TaskState.TIMEOUT)

    @classmethod
    def revoked(cls, message: str) -> Outcome:
        """A REVOKED outcome (terminated on request, or expired)."""
        return cls.of(TaskRevokedError(message), TaskState.REVOKED)


#: wraps an async task's coroutine before it is awaited (the asyncio pool's soft time limit)
Guard = Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]]
CompletionCallback = Callable[[Job, Outcome], None]


#: what the core hands every pool, bound to the worker's app and hooks (a forked child inherits
#: it); a child process calls its `process_started()` before its first job, `process_exiting()` last
Execution: TypeAlias = "Executor"


class BasePool(ABC):
    """Base of every execution pool (entry-point group `millpond.pools`): a plugin sets `name` and
    `capabilities` and implements `on_*`; the final `apply_async` and `complete` call the hooks."""

    #: the name users type after `--pool`
    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: the prefetch multiplier when the user sets none (None: the setting's default); solo raises
    #: it, as with one job at a time a window of 4 costs a broker round trip per 4 tasks
    default_prefetch_multiplier: ClassVar[int | None] = None

    def __init__(
        self,
        concurrency: int,
        on_complete: CompletionCallback,
        options: Mapping[str, Any] | None = None,
        *,
        execution: Execution,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.concurrency, self.execution = concurrency, execution
        self.options: Mapping[str, Any] = dict(options or {})
        self._on_complete = on_complete
        self._active: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.started = False
        #: set when the worker is told to stop during `on_start`: a slow start (prefork awaiting its
        #: children) undoes itself and returns, so a SIGTERM in start-up is obeyed at once
        self.start_cancelled = threading.Event()

    @classmethod
    def default_concurrency(cls) -> int:
        return os.cpu_count() or 1

    @classmethod  # noqa: B027 - an optional hook, empty on purpose
    def check_environment(cls) -> None:
        """Raise `RuntimeError` with the fix if the process is unfit (a green pool unpatched)."""

    def start(self) -> None:
        type(self).check_environment()
        self.on_start()
        self.started = not self.start_cancelled.is_set()

    def stop(self, timeout: float | None = None) -> None:
        """Warm stop: accept nothing new, let running jobs finish (at most `timeout` seconds)."""
        if self.started:
            self.started = False
            self.on_stop(timeout)

    def terminate(self) -> None:
        """Cold stop: end running jobs now; their messages go back to the broker."""
        self.started = False
        self.on_terminate()

    @final
    def apply_async(self, job: Job) -> None:
        """Hand a job to the pool: the `started` hooks, then `on_apply`."""
        self.execution.job_started(job)
        with self._lock:
            self._active[job.task_id] = job
        try:
            self.on_apply(job)
        except BaseException as exc:  # the pool could not take it: never lose the message silently
            refused = Outcome.of(exc, TaskState.LOST, message=f"pool refused the job: {exc}")
            self.complete(job, refused)

    @final
    def complete(self, job: Job, outcome: Outcome) -> None:
        """Report a finished job (from any thread, once: a second report is ignored): the
        `finished` hooks, then the worker loop."""
        with self._lock:
            if self._active.pop(job.task_id, None) is None:
                return
        self.execution.job_finished(job, outcome)
        self._on_complete(job, outcome)

    @property
    def capacity(self) -> int:
        """How many jobs the worker may hand the pool at once: its concurrency, or more for a
        pool that queues a few per execution unit so a unit never waits for the next (prefork)."""
        return self.concurrency

    @property
    def active(self) -> int:
        """How many jobs are running or waiting inside the pool."""
        return len(self._active)

    def active_jobs(self) -> list[Job]:
        with self._lock:
            return list(self._active.values())

    def terminate_job(self, task_id: str, signum: int | None = None) -> bool:
        """Stop one running job (its outcome is REVOKED), with `signum` where the pool sends
        signals; returns whether it was found. Optional (capability)."""
        raise NotSupported(f"the {self.name} pool cannot terminate a running job")

    def processes(self) -> list[int]:
        """The pids that run jobs (`stats` -> `pool.processes`); this process by default."""
        return [os.getpid()]

    def resize(self, concurrency: int) -> None:
        """Grow or shrink the pool at run time. Optional (capability)."""
        raise NotSupported(f"the {self.name} pool cannot change its size at run time")

    @abstractmethod
    def on_start(self) -> None: ...

    @abstractmethod
    def on_apply(self, job: Job) -> None:
        """Start running `self.execution.run(job)` in an execution unit; `complete` it at its end."""

    @abstractmethod
    def on_stop(self, timeout: float | None) -> None: ...

    @abstractmethod
    def on_terminate(self) -> None: ...
