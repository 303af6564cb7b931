"""The execution-pool contract: what a pool plugin implements and what the core guarantees it.

A pool receives `Job`s, picklable "run this request" objects, and runs `job.run()` in its execution
unit (the calling thread, a thread, a child process, a greenlet). `job.run()` never raises: it
returns an `Outcome`. The core owns everything around the task body (fresh context, trace context,
log context, exception capture, retry decisions), so a pool only moves jobs and outcomes. When a job
ends the pool calls `self.complete(job, outcome)` from any thread; the worker's consumer loop is
woken and does the ack, the result store and any retry publish.

A plugin subclasses `BasePool`, sets `name` and `capabilities`, and implements `on_start`, `on_apply`,
`on_stop` (warm: let running jobs finish) and `on_terminate` (cold). It never overrides
`apply_async` or `complete`: they are the template that opens and closes the `process` span.
"""

from __future__ import annotations

import os
import threading
import traceback as traceback_module
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from millpond.exceptions import NotSupported

# Outcome states. SUCCESS/FAILURE/RETRY come from the task; the others from the pool or worker.
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
RETRY = "RETRY"
REJECTED = "REJECTED"  # the task raised Reject
LOST = "LOST"  # the execution unit died (child killed, OOM): requeue or fail per policy
TIMEOUT = "TIMEOUT"  # hard time limit: the unit was stopped
REVOKED = "REVOKED"  # terminated on request, or expired before it ran


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a pool can honestly do; the worker refuses or warns about anything else."""

    soft_time_limit: bool = False
    hard_time_limit: bool = False
    terminate_job: bool = False
    resize: bool = False
    max_tasks_per_child: bool = False
    max_memory_per_child: bool = False
    #: False for pools that run one job at a time in the consumer loop's own thread (solo)
    concurrent: bool = True


@dataclass(slots=True)
class Outcome:
    """How a job ended; picklable, so it crosses process boundaries."""

    state: str
    result: Any = None
    exc_type: str | None = None
    exc_module: str | None = None
    exc_message: str = ""
    traceback: str | None = None
    countdown: float | None = None  # RETRY: seconds from now
    eta: float | None = None  # RETRY: seconds since the epoch (wins over countdown)
    requeue: bool = False  # REJECTED / LOST: put the message back instead of dead-lettering
    runtime: float = 0.0

    @classmethod
    def error(
        cls,
        state: str,
        exc_type: type[BaseException] | str,
        message: str,
        *,
        traceback: str | None = None,
        requeue: bool = False,
    ) -> Outcome:
        """An outcome the pool itself decides (lost, timeout, revoked), named by exception type."""
        if isinstance(exc_type, str):
            name, module = exc_type, "millpond.exceptions"
        else:
            name, module = exc_type.__name__, exc_type.__module__
        return cls(
            state=state,
            exc_type=name,
            exc_module=module,
            exc_message=message,
            traceback=traceback,
            requeue=requeue,
        )

    @classmethod
    def from_exception(cls, exc: BaseException, *, runtime: float = 0.0) -> Outcome:
        """A FAILURE carrying the exception's type, module, message and traceback text."""
        return cls(
            state=FAILURE,
            exc_type=type(exc).__name__,
            exc_module=type(exc).__module__,
            exc_message=str(exc),
            traceback="".join(traceback_module.format_exception(exc)),
            runtime=runtime,
        )

    @classmethod
    def hard_timeout(
        cls, job: Job, how: str = "was stopped", *, traceback: str | None = None
    ) -> Outcome:
        """The TIMEOUT a pool reports when it stopped a job at its hard time limit."""
        from millpond.exceptions import TimeLimitExceeded

        return cls.error(
            TIMEOUT,
            TimeLimitExceeded,
            f"task {job.task_name}[{job.task_id}] ran past its hard time limit of "
            f"{job.time_limit or 0:g}s and {how}",
            traceback=traceback,
        )

    @classmethod
    def revoked(cls, message: str) -> Outcome:
        """A REVOKED outcome (terminated on request, or expired)."""
        from millpond.exceptions import TaskRevokedError

        return cls.error(REVOKED, TaskRevokedError, message)


@dataclass(slots=True, eq=False)
class Job:
    """One task to run. Everything but `delivery` and `span` is picklable and crosses to children."""

    task_id: str
    task_name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    retries: int = 0
    queue: str = ""
    time_limit: float | None = None
    soft_time_limit: float | None = None
    root_id: str | None = None
    parent_id: str | None = None
    origin: str | None = None
    eta: float | None = None
    expires: float | None = None
    #: W3C trace context of the `process` span: the parent of the `run` span in the execution unit
    traceparent: str | None = None
    tracestate: str | None = None
    #: the producer's trace context, as it came in the message
    producer_traceparent: str | None = None
    producer_tracestate: str | None = None
    delivery_count: int = 1
    #: the producer's wall-clock publish time (header `millpond_sent_at`), for the queue wait
    sent_at: float | None = None
    # -- kept in the worker process only --
    delivery: Any = field(default=None, repr=False)
    span: Any = field(default=None, repr=False)
    started: float = 0.0

    def __getstate__(self) -> dict[str, Any]:
        state = {name: getattr(self, name) for name in self.__dataclass_fields__}
        state["delivery"] = None
        state["span"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)

    def run(self) -> Outcome:
        """Run the task in a fresh context with its trace and log context; never raises."""
        from millpond.execution import run_job

        return run_job(self)


CompletionCallback = Callable[[Job, Outcome], None]


class BasePool(ABC):
    """Base class of every execution pool (entry-point group `millpond.pools`)."""

    #: the name users type after `--pool`
    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: True for pools whose plugin monkey-patches the interpreter (gevent, eventlet)
    needs_patching: ClassVar[bool] = False
    #: the prefetch multiplier used when the user sets none (None: the setting's default). The
    #: solo pool raises it: with one job at a time, a window of 4 costs a broker round trip per 4
    #: tasks, and that round trip was half of its loop's time.
    default_prefetch_multiplier: ClassVar[int | None] = None

    def __init__(
        self,
        concurrency: int,
        on_complete: CompletionCallback,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.concurrency = concurrency
        self.options: Mapping[str, Any] = dict(options or {})
        self._on_complete = on_complete
        self._active: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.started = False

    @classmethod
    def default_concurrency(cls) -> int:
        return os.cpu_count() or 1

    @classmethod  # noqa: B027 - an optional hook, empty on purpose
    def check_environment(cls) -> None:
        """Raise `RuntimeError` with instructions when the process is not fit for this pool
        (a green pool started without monkey-patching, for instance)."""

    # -- lifecycle (the template; plugins implement the on_* hooks) ------------------------------
    def start(self) -> None:
        type(self).check_environment()
        self.on_start()
        self.started = True

    def stop(self, timeout: float | None = None) -> None:
        """Warm stop: accept nothing new, let running jobs finish (at most `timeout` seconds)."""
        if self.started:
            self.started = False
            self.on_stop(timeout)

    def terminate(self) -> None:
        """Cold stop: end running jobs now; their messages go back to the broker."""
        self.started = False
        self.on_terminate()

    def apply_async(self, job: Job) -> None:
        """Hand a job to the pool. Opens the `process` span, kept open until `complete`."""
        from millpond import telemetry

        if telemetry.TRACING:
            telemetry.start_process_span(job, self.name)
        with self._lock:
            self._active[job.task_id] = job
        try:
            self.on_apply(job)
        except BaseException as exc:
            # The pool could not take the job at all: report it, never lose the message silently.
            self.complete(job, Outcome.error(LOST, type(exc), f"pool refused the job: {exc}"))

    def complete(self, job: Job, outcome: Outcome) -> None:
        """Report a finished job (from any thread). Idempotent per job."""
        with self._lock:
            if self._active.pop(job.task_id, None) is None:
                return
        if job.span is not None:
            from millpond import telemetry

            telemetry.end_process_span(job, outcome)
        self._on_complete(job, outcome)

    @property
    def active(self) -> int:
        """How many jobs are running or waiting inside the pool."""
        return len(self._active)

    def active_jobs(self) -> list[Job]:
        with self._lock:
            return list(self._active.values())

    # -- optional capabilities -------------------------------------------------------------------
    def terminate_job(self, task_id: str) -> bool:
        """Stop one running job (its outcome is REVOKED); returns whether it was found."""
        raise NotSupported(f"the {self.name} pool cannot terminate a running job")

    def resize(self, concurrency: int) -> None:
        """Grow or shrink the pool at run time."""
        raise NotSupported(f"the {self.name} pool cannot change its size at run time")

    # -- plugin hooks ----------------------------------------------------------------------------
    @abstractmethod
    def on_start(self) -> None: ...

    @abstractmethod
    def on_apply(self, job: Job) -> None:
        """Start running `job.run()` in an execution unit; call `self.complete` when it ends."""

    @abstractmethod
    def on_stop(self, timeout: float | None) -> None: ...

    @abstractmethod
    def on_terminate(self) -> None: ...
