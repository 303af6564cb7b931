"""The gevent pool: one greenlet per job, all of them in the worker's single OS thread.

How it fits the worker: the consumer loop runs in the main greenlet and does every broker call; each
job runs `job.run()` in a greenlet of its own and calls `complete()` from there when it ends, which
writes to the Inbox's socket pair. That socket pair is gevent's (the process is patched), so the
loop's `select` is a hub wait and wakes at once.

Why greenlets can be counted in the hundreds or thousands: a greenlet waiting on a socket or a
timer costs a few kilobytes and no OS thread. The price is cooperation: a greenlet runs until it
yields to the hub (any patched I/O, `time.sleep`, lock wait). A task that computes for a second
without yielding stops every other greenlet for that second, the consumer loop and the broker's
heartbeat greenlets included, and it cannot be interrupted: time limits and `terminate_job` are
exceptions thrown into the greenlet by the hub, which only runs when someone yields.

The pool keeps its own count of running greenlets instead of a bounded `gevent.pool.Pool`: `Pool`
blocks the caller when it is full (the caller is the consumer loop), has no supported way to change
its size, and its `Greenlet` objects (links, events) cost about 10 us a job, a quarter of the whole
per-job cost of the pool. Jobs run in raw greenlets (`gevent.spawn_raw`), which `gevent.kill`,
`gevent.killall` and `gevent.Timeout` handle like any other. Jobs beyond the current size wait in a
FIFO inside the pool; the worker normally never hands over more than `concurrency`, so it stays
empty.
"""

from __future__ import annotations

import time
import traceback
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.event
import structlog
from greenlet import GreenletExit, greenlet

from millpond.exceptions import (
    ConfigurationError,
    SoftTimeLimitExceeded,
)
from millpond.pool import (
    TIMEOUT,
    BasePool,
    Capabilities,
    CompletionCallback,
    Job,
    Outcome,
)
from millpond_pool_gevent import patch

__all__ = ["GeventPool"]

log = structlog.get_logger("millpond.pool.gevent")


class _Terminated(GreenletExit):  # type: ignore[misc]  # greenlet is untyped
    """Thrown into a job's greenlet by `terminate_job`.

    A `GreenletExit` (so a `BaseException`): task code that catches `Exception` cannot swallow it,
    and gevent does not print it as an error if it escapes.
    """


class _Abandoned(GreenletExit):  # type: ignore[misc]
    """Thrown into running greenlets by a cold stop: the job ends without an outcome, so its
    message stays unacknowledged and goes back to the broker when the consumer closes."""


@dataclass(slots=True, eq=False)
class _Unit:
    """One job's greenlet and what `terminate_job` needs to know about it."""

    job: Job
    greenlet: greenlet | None = None
    begun: bool = False
    #: set by `terminate_job` before the greenlet began: it reports REVOKED instead of running
    revoked: bool = False
    #: set by a cold stop: the job ends without an outcome
    abandoned: bool = False


class GeventPool(BasePool):
    """Runs each job in its own greenlet; needs `millpond_pool_gevent.patch.patch()` first."""

    name = "gevent"
    capabilities = Capabilities(
        soft_time_limit=True,  # a catchable exception thrown at the task's next yield point
        hard_time_limit=True,  # gevent.Timeout: stops the task at its next yield point
        terminate_job=True,
        resize=True,
    )
    needs_patching = True

    def __init__(
        self,
        concurrency: int,
        on_complete: CompletionCallback,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(concurrency, on_complete, options)
        if self.options:
            raise ConfigurationError(
                f"the gevent pool has no settings, but got {', '.join(sorted(self.options))} "
                f"(from a [gevent] section or MILLPOND_GEVENT__* variables); remove them"
            )
        self._units: dict[str, _Unit] = {}
        self._waiting: deque[Job] = deque()
        self._idle = gevent.event.Event()
        self._idle.set()
        self._accepting = False

    @classmethod
    def default_concurrency(cls) -> int:
        return 100

    @classmethod
    def check_environment(cls) -> None:
        missing = patch.missing()
        if missing:
            raise RuntimeError(
                f"the gevent pool needs this process monkey-patched by gevent before anything "
                f"else is imported, and {', '.join(missing)} are not patched: without it the "
                "worker would hang in its first blocking call. Start the worker with the "
                "`millpond` command (`millpond worker -P gevent`, MILLPOND_POOL=gevent or "
                'pool = "gevent" in millpond.toml), which patches first; or call '
                "millpond_pool_gevent.patch.patch() as the very first statement of your program, "
                "before importing millpond or your app"
            )

    # -- lifecycle -------------------------------------------------------------------------------
    def on_start(self) -> None:
        self._accepting = True

    def on_apply(self, job: Job) -> None:
        if not self._accepting:
            raise RuntimeError("the gevent pool is not running (never started, or stopping)")
        self._waiting.append(job)
        self._idle.clear()
        self._fill()

    def on_stop(self, timeout: float | None) -> None:
        self._accepting = False
        if self._idle.wait(timeout):
            return
        log.warning(
            "warm stop of the gevent pool timed out; abandoning the tasks still running "
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
        # Greenlets blocked in I/O die at once; one computing without yielding cannot be reached,
        # so do not wait for it for long.
        gevent.killall(running, _Abandoned, block=True, timeout=1.0)

    # -- optional capabilities -------------------------------------------------------------------
    def terminate_job(self, task_id: str) -> bool:
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
            gevent.kill(unit.greenlet, _Terminated())
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
            unit = _Unit(job)
            self._units[job.task_id] = unit
            unit.greenlet = gevent.spawn_raw(self._execute, unit)

    def _check_idle(self) -> None:
        if not self._units and not self._waiting:
            self._idle.set()

    def _execute(self, unit: _Unit) -> None:
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
        """`job.run()` under the job's time limits; None when the job was abandoned."""
        hard = gevent.Timeout(job.time_limit) if job.time_limit else None
        soft = None
        if job.soft_time_limit and (not job.time_limit or job.soft_time_limit < job.time_limit):
            soft = gevent.Timeout(
                job.soft_time_limit,
                SoftTimeLimitExceeded(
                    f"task {job.task_name}[{job.task_id}] passed its soft time limit of "
                    f"{job.soft_time_limit:g}s"
                ),
            )
        started = time.perf_counter()
        try:
            try:
                if hard is not None:
                    hard.start()
                if soft is not None:
                    soft.start()
                outcome = job.run()
            finally:
                for timer in (soft, hard):
                    if timer is not None:
                        timer.close()
        except _Abandoned:
            return None
        except _Terminated:
            outcome = Outcome.revoked("terminated on request while it was running")
        except gevent.Timeout as exc:
            if exc is not hard:  # the task's own gevent.Timeout escaped: the task failed
                outcome = Outcome.from_exception(exc)
            else:
                outcome = Outcome.hard_timeout(job, traceback=traceback.format_exc())
        except GreenletExit:
            return None  # killed by someone else (interpreter shutdown): leave the message be
        except BaseException as exc:  # job.run() never raises; this is a throw outside the task
            outcome = Outcome.from_exception(exc)
        elapsed = time.perf_counter() - started
        if outcome.runtime == 0.0:
            outcome.runtime = elapsed
        if job.time_limit and elapsed > job.time_limit and outcome.state != TIMEOUT:
            log.warning(
                "task ran past its hard time limit without yielding to gevent, so it could not "
                "be stopped; a green pool can only interrupt a task at an I/O or sleep call",
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
            log.exception("cannot report a finished task", task_id=job.task_id)
