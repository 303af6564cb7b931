"""The eventlet pool: one greenthread per job, all of them in the worker's single OS thread.

eventlet is deprecated upstream (bugfix-only maintenance, and its authors advise against it for new
projects). This pool exists for applications already built on eventlet; it works and is tested the
same way as the gevent pool, logs a one-line notice when it starts, and the docs recommend gevent.

How it fits the worker: the consumer loop runs in the main greenthread and does every broker call;
each job runs `job.run()` in a greenthread of an `eventlet.GreenPool` and calls `complete()` from
there when it ends, which writes to the Inbox's socket pair. That socket pair is eventlet's (the
process is patched), so the loop's `select` is a hub wait and wakes at once.

The price of greenthreads is cooperation: one runs until it yields to the hub (any patched I/O,
`time.sleep`, lock wait). A task that computes without yielding stops every other greenthread, the
consumer loop and the broker's heartbeats included, and it cannot be interrupted: time limits and
`terminate_job` are exceptions thrown into the greenthread, which only happens when it yields.

The GreenPool's size is the pool's concurrency (`GreenPool.resize` grows and shrinks it). Jobs are
spawned only while it has a free slot, because `GreenPool.spawn` on a full pool blocks its caller
(the consumer loop); jobs beyond the size wait in a FIFO inside the pool and are spawned from a
link that runs after a finished greenthread gave its slot back.
"""

from __future__ import annotations

import time
import traceback
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from greenlet import GreenletExit

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
from millpond_pool_eventlet import greenselect, patch

patch.import_eventlet()  # the first import of eventlet, without its multi-line warning
import eventlet  # noqa: E402
from eventlet import greenpool, greenthread  # noqa: E402

__all__ = ["EventletPool"]

log = structlog.get_logger("millpond.pool.eventlet")

DEPRECATION_NOTICE = (
    "the eventlet pool is legacy: eventlet is deprecated upstream (bugfix-only); it works here, "
    "but new deployments should use --pool gevent"
)


class _Terminated(GreenletExit):  # type: ignore[misc]  # greenlet is untyped
    """Thrown into a job's greenthread by `terminate_job`.

    A `GreenletExit` (so a `BaseException`): task code that catches `Exception` cannot swallow it,
    and it ends a greenthread without the hub printing it as an error.
    """


class _Abandoned(GreenletExit):  # type: ignore[misc]
    """Thrown into running greenthreads by a cold stop: the job ends without an outcome, so its
    message stays unacknowledged and goes back to the broker when the consumer closes."""


@dataclass(slots=True, eq=False)
class _Unit:
    """One job's greenthread and what `terminate_job` needs to know about it."""

    job: Job
    thread: Any = None  # eventlet.greenthread.GreenThread
    begun: bool = False
    #: set by `terminate_job` before the greenthread began: it reports REVOKED instead of running
    revoked: bool = False
    #: set by a cold stop: the job ends without an outcome
    abandoned: bool = False


class EventletPool(BasePool):
    """Runs each job in its own greenthread; needs `millpond_pool_eventlet.patch.patch()` first."""

    name = "eventlet"
    capabilities = Capabilities(
        soft_time_limit=True,  # a catchable exception thrown at the task's next yield point
        hard_time_limit=True,  # eventlet.Timeout: stops the task at its next yield point
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
                f"the eventlet pool has no settings, but got {', '.join(sorted(self.options))} "
                f"(from a [eventlet] section or MILLPOND_EVENTLET__* variables); remove them"
            )
        self._greenpool = greenpool.GreenPool(concurrency)
        self._units: dict[str, _Unit] = {}
        self._waiting: deque[Job] = deque()
        self._accepting = False

    @classmethod
    def default_concurrency(cls) -> int:
        return 100

    @classmethod
    def check_environment(cls) -> None:
        missing = patch.missing()
        if missing:
            raise RuntimeError(
                f"the eventlet pool needs this process monkey-patched by eventlet before anything "
                f"else is imported, and {', '.join(missing)} are not patched: without it the "
                "worker would hang in its first blocking call. Start the worker with the "
                "`millpond` command (`millpond worker -P eventlet`, MILLPOND_POOL=eventlet or "
                'pool = "eventlet" in millpond.toml), which patches first; or call '
                "millpond_pool_eventlet.patch.patch() as the very first statement of your "
                "program, before importing millpond or your app"
            )

    # -- lifecycle -------------------------------------------------------------------------------
    def on_start(self) -> None:
        log.warning(DEPRECATION_NOTICE)
        greenselect.install()  # in case the process was patched without `patch()`
        self._accepting = True

    def on_apply(self, job: Job) -> None:
        if not self._accepting:
            raise RuntimeError("the eventlet pool is not running (never started, or stopping)")
        self._waiting.append(job)
        self._fill()

    def on_stop(self, timeout: float | None) -> None:
        self._accepting = False
        with eventlet.Timeout(timeout, False):  # False: expiry ends the `with`, raises nothing
            while self._units or self._waiting:
                if self._greenpool.running():
                    self._greenpool.waitall()
                else:
                    self._fill()
                    eventlet.sleep(0)
        if not self._units and not self._waiting:
            return
        log.warning(
            "warm stop of the eventlet pool timed out; abandoning the tasks still running "
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
        units = list(self._units.values())
        self._units.clear()
        for unit in units:
            unit.abandoned = True  # a greenthread that has not begun yet ends without running
            if unit.begun and unit.thread is not None and not unit.thread.dead:
                # eventlet switches into the greenthread at once: it ends before kill returns,
                # unless it computes without yielding (then nothing can reach it).
                greenthread.kill(unit.thread, _Abandoned())

    # -- optional capabilities -------------------------------------------------------------------
    def terminate_job(self, task_id: str) -> bool:
        for job in self._waiting:
            if job.task_id == task_id:
                self._waiting.remove(job)
                self._report(job, Outcome.revoked("terminated on request before it started"))
                return True
        unit = self._units.get(task_id)
        if unit is None:
            return False
        if not unit.begun or unit.thread is None:
            unit.revoked = True  # its greenthread reports REVOKED as soon as it is scheduled
        else:
            greenthread.kill(unit.thread, _Terminated())
        return True

    def resize(self, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        # Shrinking lets the running greenthreads finish; no new one starts until fewer run.
        self._greenpool.resize(concurrency)
        self.concurrency = concurrency
        self._fill()

    # -- running jobs ----------------------------------------------------------------------------
    def _fill(self) -> None:
        pool = self._greenpool
        while self._waiting and pool.free() > 0:
            job = self._waiting.popleft()
            unit = _Unit(job)
            self._units[job.task_id] = unit
            unit.thread = pool.spawn(self._execute, unit)
            # Links run in order when the greenthread ends: the GreenPool's own (which frees the
            # slot) first, then this one, which can therefore spawn the next waiting job.
            unit.thread.link(self._refill)

    def _refill(self, _thread: Any) -> None:
        if self._waiting:
            self._fill()

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

    def _run(self, job: Job) -> Outcome | None:
        """`job.run()` under the job's time limits; None when the job was abandoned."""
        hard = eventlet.Timeout(job.time_limit) if job.time_limit else None
        soft = None
        if job.soft_time_limit and (not job.time_limit or job.soft_time_limit < job.time_limit):
            soft = eventlet.Timeout(
                job.soft_time_limit,
                SoftTimeLimitExceeded(
                    f"task {job.task_name}[{job.task_id}] passed its soft time limit of "
                    f"{job.soft_time_limit:g}s"
                ),
            )
        started = time.perf_counter()
        try:
            try:
                outcome = job.run()
            finally:
                for timer in (soft, hard):
                    if timer is not None:
                        timer.cancel()
        except _Abandoned:
            return None
        except _Terminated:
            outcome = Outcome.revoked("terminated on request while it was running")
        except eventlet.Timeout as exc:
            if exc is not hard:  # the task's own eventlet.Timeout escaped: the task failed
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
                "task ran past its hard time limit without yielding to eventlet, so it could not "
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
