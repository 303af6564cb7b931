"""The threads pool: N long-lived threads fed through one queue.

Threads suit I/O-bound tasks (HTTP calls, database queries): the GIL is released while they wait,
so N threads overlap N waits. CPU-bound Python code does not run faster with more threads; use
prefork for that. Each task already runs in a fresh `contextvars.Context` (the core's `run_job`),
so a reused thread carries nothing of the previous task.

What it honours: soft time limits (best effort, see `softlimit`), grow and shrink at run time. What
it cannot honour, and so does not declare: hard time limits and terminating one running job (a
thread cannot be killed from outside without risking the whole process). The worker warns about
tasks that ask for them.

Default concurrency is min(32, CPU count + 4), like `concurrent.futures.ThreadPoolExecutor`:
enough overlap for I/O without hundreds of idle threads on a big machine.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

from millpond.contracts.pool import (
    BasePool,
    Capabilities,
    CompletionCallback,
    Execution,
    Job,
    Outcome,
)
from millpond.exceptions import SoftTimeLimitExceeded
from millpond_pool_threads import softlimit
from millpond_pool_threads.settings import resolve

__all__ = ["ThreadPool"]


class _Unit(threading.Thread):
    """One pool thread and its soft-limit slot."""

    def __init__(self, pool: ThreadPool, number: int) -> None:
        super().__init__(name=f"millpond-threads-{number}", daemon=True)
        self.pool = pool
        self.slot: softlimit.Slot | None = None

    def run(self) -> None:
        self.slot = softlimit.Slot(threading.get_ident())
        self.pool._serve(self)


class ThreadPool(BasePool):
    name = "threads"
    capabilities = Capabilities(
        soft_time_limit=softlimit.SUPPORTED,
        hard_time_limit=False,
        terminate_job=False,
        resize=True,
    )

    @classmethod
    def default_concurrency(cls) -> int:
        return min(32, (os.cpu_count() or 1) + 4)

    def __init__(
        self,
        concurrency: int,
        on_complete: CompletionCallback,
        options: Mapping[str, Any] | None = None,
        *,
        execution: Execution,
    ) -> None:
        super().__init__(concurrency, on_complete, options, execution=execution)
        self.config = resolve(self.options)
        #: jobs, and one None per thread that should exit
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._units: set[_Unit] = set()
        self._units_lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._soft = softlimit.SoftLimits()
        self._abandoned = False

    # -- lifecycle -------------------------------------------------------------------------------
    def on_start(self) -> None:
        self._abandoned = False
        self._spawn(self.concurrency)

    def on_apply(self, job: Job) -> None:
        self._queue.put(job)

    def on_stop(self, timeout: float | None) -> None:
        with self._units_lock:
            units = list(self._units)
        for _ in units:
            self._queue.put(None)
        deadline = None if timeout is None else time.monotonic() + timeout
        for unit in units:
            unit.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._soft.stop()

    def on_terminate(self) -> None:
        """Cold: drop queued jobs and stop reporting; running tasks cannot be interrupted, so
        their (daemon) threads finish them unreported and exit."""
        self._abandoned = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        with self._units_lock:
            count = len(self._units)
        for _ in range(count):
            self._queue.put(None)
        self._soft.stop()

    def resize(self, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        with self._units_lock:
            change = concurrency - self.concurrency
            self.concurrency = concurrency
        if change > 0:
            self._spawn(change)
        for _ in range(-change):
            self._queue.put(None)  # the first threads to become free leave

    # -- the threads -----------------------------------------------------------------------------
    def _spawn(self, count: int) -> None:
        previous = None
        if self.config.stack_size is not None:
            previous = threading.stack_size(self.config.stack_size * 1024)
        try:
            for _ in range(count):
                unit = _Unit(self, next(self._numbers))
                with self._units_lock:
                    self._units.add(unit)
                unit.start()
        finally:
            if previous is not None:
                threading.stack_size(previous)

    def _serve(self, unit: _Unit) -> None:
        try:
            while True:
                job = self._queue.get()
                if job is None:
                    return
                self._run_one(unit, job)
        finally:
            with self._units_lock:
                self._units.discard(unit)

    def _run_one(self, unit: _Unit, job: Job) -> None:
        slot = unit.slot
        assert slot is not None
        outcome: Outcome | None = None
        try:
            try:
                slot.begin(job)
                if job.soft_time_limit:
                    self._soft.arm(slot, job, job.soft_time_limit)
                outcome = self.execution.run(job)
            finally:
                slot.end()
        except SoftTimeLimitExceeded as exc:
            # The limit landed after the task body returned, in the few bytecodes before the
            # slot was cleared: the outcome stands if there is one.
            slot.end()
            if outcome is None:
                outcome = Outcome.of(exc)
        except BaseException as exc:
            # KeyboardInterrupt, GeneratorExit or a custom BaseException out of the task body:
            # the core lets it through; ending this thread with it would lose the job (never
            # completed) and a unit. The task fails with it, as any other exception.
            slot.end()
            outcome = Outcome.of(exc)
        if not self._abandoned:
            self.complete(job, outcome)
