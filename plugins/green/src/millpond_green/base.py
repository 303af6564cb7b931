"""The base of the green pools: one greenlet per job, all of them in the worker's single OS thread.

gevent and eventlet run jobs the same way and differ only in a handful of library calls, so the
pool itself lives here and each plugin supplies those primitives (`spawn`, `kill`, `kill_all`,
`start_timeout` / `cancel_timeout` and the `timeout_error` they raise, `new_event`), its patch
check (`unpatched`) and anything of its own (eventlet's deprecation notice). Nothing here imports
gevent or eventlet; the module needs `greenlet`, which both of them depend on.

How it fits the worker: the consumer loop runs in the main greenlet and does every broker call;
each job runs `self.execution.run(job)` in a greenlet of its own and calls `complete()` from there
when it ends, which writes to the Inbox's socket pair. That socket pair is the green library's (the
process is patched), so the loop's `select` is a hub wait and wakes at once.

Why greenlets can be counted in the hundreds or thousands: a greenlet waiting on a socket or a
timer costs a few kilobytes and no OS thread. The price is cooperation: a greenlet runs until it
yields to the hub (any patched I/O, `time.sleep`, lock wait). A task that computes for a second
without yielding stops every other greenlet for that second, the consumer loop and the broker's
heartbeat greenlets included, and it cannot be interrupted: time limits and `terminate_job` are
exceptions thrown into the greenlet by the hub, which only runs when someone yields.

The pool keeps its own count of running greenlets instead of the library's bounded pools
(`gevent.pool.Pool`, `eventlet.GreenPool`): those block the caller when they are full (the caller
is the consumer loop), and their greenlet objects (links, events) cost several microseconds a job.
Jobs run in raw greenlets, which the libraries' kill and timeout calls handle like any other. Jobs
beyond the current size wait in a FIFO inside the pool. The pool's `capacity` is its size plus a
fifth: a greenlet that finishes starts the FIFO's next job at once, instead of leaving its slot
empty until the consumer loop's next turn (which may be waiting on two broker round trips). With
10 ms tasks at concurrency 100 that wait was most of what kept the pool from its bound. Any free
greenlet takes the FIFO's head, so nothing waits behind a long task; like the jobs queued in a
prefork child, the FIFO's jobs still run on a warm stop, and go back to the broker if it times out.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import structlog
from greenlet import GreenletExit

from millpond.contracts.pool import (
    BasePool,
    Capabilities,
    CompletionCallback,
    Execution,
    Job,
    Outcome,
)
from millpond.exceptions import (
    ConfigurationError,
    SoftTimeLimitExceeded,
)
from millpond.states import TaskState

__all__ = ["GreenEvent", "GreenPool", "Unit"]


class Terminated(GreenletExit):  # type: ignore[misc]  # greenlet is untyped
    """Thrown into a job's greenlet by `terminate_job`.

    A `GreenletExit` (so a `BaseException`): task code that catches `Exception` cannot swallow it,
    and it ends a greenlet without the hub printing it as an error.
    """


class Abandoned(GreenletExit):  # type: ignore[misc]
    """Thrown into running greenlets by a cold stop: the job ends without an outcome, so its
    message stays unacknowledged and goes back to the broker when the consumer closes."""


class GreenEvent(Protocol):
    """The green library's resettable event (`gevent.event.Event`, eventlet's green threading)."""

    def set(self) -> None: ...
    def clear(self) -> None: ...
    def wait(self, timeout: float | None = None) -> bool | None: ...


@dataclass(slots=True, eq=False)
class Unit:
    """One job's greenlet and what `terminate_job` needs to know about it."""

    job: Job
    greenlet: Any = None
    begun: bool = False
    #: set by `terminate_job` before the greenlet began: it reports REVOKED instead of running
    revoked: bool = False
    #: set by a cold stop: the job ends without an outcome
    abandoned: bool = False


class GreenPool(BasePool):
    """Runs each job in its own greenlet; the plugin gives the library's primitives."""

    capabilities = Capabilities(
        soft_time_limit=True,  # a catchable exception thrown at the task's next yield point
        hard_time_limit=True,  # the library's Timeout: stops the task at its next yield point
        terminate_job=True,
        resize=True,
    )
    #: what a user calls to patch by hand, for the refusal of an unpatched process
    patch_call: ClassVar[str] = ""
    #: the exception class of the library's timeouts (`gevent.Timeout`, `eventlet.Timeout`)
    timeout_error: ClassVar[type[BaseException]]

    def __init__(
        self,
        concurrency: int,
        on_complete: CompletionCallback,
        options: Mapping[str, Any] | None = None,
        *,
        execution: Execution,
    ) -> None:
        super().__init__(concurrency, on_complete, options, execution=execution)
        if self.options:
            raise ConfigurationError(
                f"the {self.name} pool has no settings, but got {', '.join(sorted(self.options))} "
                f"(from a [{self.name}] section or MILLPOND_{self.name.upper()}__* variables); "
                "remove them"
            )
        self._log = structlog.get_logger(f"millpond.pool.{self.name}")
        self._units: dict[str, Unit] = {}
        self._waiting: deque[Job] = deque()
        self._idle = self.new_event()
        self._idle.set()
        self._accepting = False

    # -- the library's primitives ----------------------------------------------------------------
    @classmethod
    @abstractmethod
    def unpatched(cls) -> list[str]:
        """The modules the library should have patched in this process and has not."""

    @abstractmethod
    def spawn(self, run: Callable[[Unit], None], unit: Unit) -> Any:
        """Start `run(unit)` in a new raw greenlet (scheduled, not switched to); return it."""

    @abstractmethod
    def kill(self, greenlet: Any, exception: BaseException) -> None:
        """Throw `exception` into a running greenlet."""

    def kill_all(self, greenlets: list[Any], exception: BaseException) -> None:
        """Throw `exception` into each running greenlet, waiting a little for them to end (one
        that computes without yielding cannot be reached, so not for long)."""
        for greenlet in greenlets:
            if not greenlet.dead:
                self.kill(greenlet, exception)

    @abstractmethod
    def start_timeout(self, seconds: float, exception: BaseException | None = None) -> Any:
        """A started timer raising `exception` (or the timer itself, a `timeout_error`) in the
        current greenlet after `seconds`."""

    @abstractmethod
    def cancel_timeout(self, timer: Any) -> None: ...

    @abstractmethod
    def new_event(self) -> GreenEvent:
        """A resettable event whose `wait(timeout)` yields to the hub and returns whether it is set."""

    # -- the pool --------------------------------------------------------------------------------
    @classmethod
    def default_concurrency(cls) -> int:
        return 100

    @property
    def capacity(self) -> int:
        """The running greenlets and a fifth more waiting in the FIFO (see the module docstring)."""
        return self.concurrency + max(1, self.concurrency // 5)

    @classmethod
    def check_environment(cls) -> None:
        missing = cls.unpatched()
        if missing:
            raise RuntimeError(
                f"the {cls.name} pool needs this process monkey-patched by {cls.name} before "
                f"anything else is imported, and {', '.join(missing)} are not patched: without it "
                "the worker would hang in its first blocking call. Start the worker with the "
                f"`millpond` command (`millpond worker -P {cls.name}`, MILLPOND_POOL={cls.name} or "
                f'pool = "{cls.name}" in millpond.toml), which patches first; or call '
                f"{cls.patch_call} as the very first statement of your program, before importing "
                "millpond or your app"
            )

    def on_start(self) -> None:
        self._accepting = True

    def on_apply(self, job: Job) -> None:
        if not self._accepting:
            raise RuntimeError(f"the {self.name} pool is not running (never started, or stopping)")
        self._waiting.append(job)
        self._idle.clear()
        self._fill()

    def on_stop(self, timeout: float | None) -> None:
        self._accepting = False
        if self._idle.wait(timeout):
            return
        self._log.warning(
            f"warm stop of the {self.name} pool timed out; abandoning the tasks still running "
            "(their messages go back to the broker)",
            timeout=timeout,
            running=len(self._units),
        )
        self._abandon()

    def on_terminate(self) -> None:
        self._accepting = False
        self._abandon()

    def _abandon(self) -> None:
        self._waiting.clear()
        running = []
        for unit in self._units.values():
            unit.abandoned = True  # a greenlet that has not begun yet ends without running
            if unit.begun and unit.greenlet is not None:
                running.append(unit.greenlet)
        self._units.clear()
        self._idle.set()
        self.kill_all(running, Abandoned())

    def terminate_job(self, task_id: str, signum: int | None = None) -> bool:
        for job in self._waiting:
            if job.task_id == task_id:
                self._waiting.remove(job)
                self._report(job, Outcome.revoked("terminated on request before it started"))
                self._check_idle()
                return True
        unit = self._units.get(task_id)
        if unit is None:
            return False
        if not unit.begun or unit.greenlet is None:
            unit.revoked = True  # its greenlet reports REVOKED as soon as it is scheduled
        else:
            self.kill(unit.greenlet, Terminated())
        return True

    def resize(self, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        # Shrinking lets the running greenlets finish; no new one starts until fewer run.
        self.concurrency = concurrency
        self._fill()

    # -- running jobs ----------------------------------------------------------------------------
    def _fill(self) -> None:
        while self._waiting and len(self._units) < self.concurrency:
            job = self._waiting.popleft()
            unit = Unit(job)
            self._units[job.task_id] = unit
            unit.greenlet = self.spawn(self._execute, unit)

    def _check_idle(self) -> None:
        if not self._units and not self._waiting:
            self._idle.set()

    def _execute(self, unit: Unit) -> None:
        job = unit.job
        unit.begun = True
        outcome: Outcome | None
        if unit.abandoned:
            outcome = None
        elif unit.revoked:
            outcome = Outcome.revoked("terminated on request before it started")
        else:
            outcome = self._run(job)
        if self._units.get(job.task_id) is unit:
            del self._units[job.task_id]
        if outcome is not None:
            self._report(job, outcome)
        self._fill()
        self._check_idle()

    def _run(self, job: Job) -> Outcome | None:
        """`self.execution.run(job)` under the job's time limits; None when the job was abandoned."""
        hard = soft = None
        started = time.perf_counter()
        try:
            try:
                if job.time_limit:
                    hard = self.start_timeout(job.time_limit)
                if job.soft_time_limit and (
                    not job.time_limit or job.soft_time_limit < job.time_limit
                ):
                    soft = self.start_timeout(
                        job.soft_time_limit,
                        SoftTimeLimitExceeded(
                            f"task {job.task_name}[{job.task_id}] passed its soft time limit of "
                            f"{job.soft_time_limit:g}s"
                        ),
                    )
                outcome = self.execution.run(job)
            finally:
                for timer in (soft, hard):
                    if timer is not None:
                        self.cancel_timeout(timer)
        except Abandoned:
            return None
        except Terminated:
            outcome = Outcome.revoked("terminated on request while it was running")
        except self.timeout_error as exc:
            if exc is not hard:  # the task's own library Timeout escaped: the task failed
                outcome = Outcome.of(exc)
            else:
                outcome = Outcome.hard_timeout(job, "was stopped", where=exc)
        except GreenletExit:
            return None  # killed by someone else (interpreter shutdown): leave the message be
        except BaseException as exc:  # job.run() never raises; this is a throw outside the task
            outcome = Outcome.of(exc)
        elapsed = time.perf_counter() - started
        if outcome.runtime == 0.0:
            outcome.runtime = elapsed
        if job.time_limit and elapsed > job.time_limit and outcome.state != TaskState.TIMEOUT:
            self._log.warning(
                f"task ran past its hard time limit without yielding to {self.name}, so it could "
                "not be stopped; a green pool can only interrupt a task at an I/O or sleep call",
                task_id=job.task_id,
                task_name=job.task_name,
                time_limit=job.time_limit,
                runtime=round(elapsed, 3),
            )
        return outcome

    def _report(self, job: Job, outcome: Outcome) -> None:
        try:
            self.complete(job, outcome)
        except Exception:
            self._log.exception("cannot report a finished task", task_id=job.task_id)
