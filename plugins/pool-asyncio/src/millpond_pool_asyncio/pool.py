"""The asyncio pool: `async def` tasks run natively on one event loop in a dedicated thread.

The worker's consumer loop stays synchronous; this pool owns a second thread whose event loop runs
up to `concurrency` task coroutines at once (a job beyond that waits in the pool until a slot
frees). Jobs arrive through `call_soon_threadsafe` and outcomes leave through `complete`, which is
thread-safe. Each coroutine runs in its own asyncio task with a fresh context (the core's
`run_job_async`), so trace and log context never cross between concurrent tasks.

Both directions are batched, because a no-op task costs less than a loop wake-up: `on_apply`
appends to a deque and wakes the loop only when no wake-up is pending (one `call_soon_threadsafe`
takes every job that arrived since), and executor threads report their slot free the same way.

Time limits are cancellations: the hard limit reports TIMEOUT at the deadline and cancels the task;
the soft limit raises SoftTimeLimitExceeded at the task's current `await` (see soft_limit.py);
`terminate_job` reports REVOKED and cancels. A coroutine that swallows CancelledError keeps its
slot until it ends, so the concurrency limit stays true even then.

Plain `def` tasks run in the pool's executor (at most `executor_threads` threads, the concurrency
by default), so a blocking call never stalls the loop. They are submitted to it straight from the
loop, without an asyncio task or future of their own, and the executor thread reports the outcome
itself (`complete` is thread-safe): a thread hop less per job. There the limits are best
effort, as on the threads pool: the outcome is reported on time, and the thread is interrupted with
an asynchronous exception at its next bytecode (see interrupt.py). `sync_tasks = "refuse"` fails
them instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from millpond.contracts.pool import (
    BasePool,
    Capabilities,
    CompletionCallback,
    Execution,
    Guard,
    Job,
    Outcome,
)
from millpond.exceptions import (
    NotSupported,
    SoftTimeLimitExceeded,
    TaskRevokedError,
    TimeLimitExceeded,
)
from millpond.states import TaskState
from millpond_pool_asyncio.interrupt import ThreadSlot
from millpond_pool_asyncio.settings import SETTINGS
from millpond_pool_asyncio.soft_limit import SoftLimited

log = structlog.get_logger("millpond.pool.asyncio")

#: seconds `terminate` waits for cancelled coroutines to unwind before it stops the loop anyway
TERMINATE_GRACE = 1.0


class _Running:
    """One admitted job: its asyncio task and, for a plain `def` task, the thread running it."""

    __slots__ = ("job", "task", "thread", "timers")

    def __init__(self, job: Job) -> None:
        self.job = job
        self.task: asyncio.Task[None] | None = None
        self.thread: ThreadSlot | None = None
        #: a plain `def` job's time-limit timers, cancelled when its slot is released
        self.timers: list[asyncio.TimerHandle] = []


class AsyncioPool(BasePool):
    """Runs `async def` tasks on an event loop; `concurrency` is how many coroutines run at once."""

    name = "asyncio"
    capabilities = Capabilities(
        soft_time_limit=True, hard_time_limit=True, terminate_job=True, resize=True
    )

    def __init__(
        self,
        concurrency: int,
        on_complete: CompletionCallback,
        options: Mapping[str, Any] | None = None,
        *,
        execution: Execution,
    ) -> None:
        super().__init__(concurrency, on_complete, options, execution=execution)
        config = SETTINGS.resolve(self.options)  # validated by the worker; checked again for tests
        self._refuse_sync = config["sync_tasks"] == "refuse"
        #: None: as many threads as the concurrency, following resize()
        self._fixed_threads: int | None = config["executor_threads"]
        self._executor_threads: int = self._fixed_threads or concurrency
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None
        # touched only on the loop's thread:
        self._running: dict[str, _Running] = {}
        self._waiting: deque[Job] = deque()
        self._idle: asyncio.Event | None = None
        self._terminating = False
        # filled from other threads, emptied on the loop's thread; a flag per deque says a
        # wake-up is already scheduled, so a burst of jobs or completions costs one wake-up
        self._arrived: deque[Job] = deque()
        self._arrival_pending = False
        self._finished: deque[_Running] = deque()
        self._finish_pending = False

    @classmethod
    def default_concurrency(cls) -> int:
        return 100

    # -- lifecycle -------------------------------------------------------------------------------
    def on_start(self) -> None:
        loop = asyncio.new_event_loop()
        self._executor = ThreadPoolExecutor(
            max_workers=self._executor_threads, thread_name_prefix="millpond-asyncio-sync"
        )
        loop.set_default_executor(self._executor)  # for tasks that use it too
        ready = threading.Event()
        self._loop = loop
        self._thread = threading.Thread(
            target=self._serve, args=(loop, ready), name="millpond-asyncio", daemon=True
        )
        self._thread.start()
        ready.wait()

    def _serve(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        self._idle = asyncio.Event()
        self._idle.set()
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def on_apply(self, job: Job) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the asyncio pool is not started")
        self._arrived.append(job)
        if not self._arrival_pending:
            # cleared by `_take` before it empties the deque: a job appended after that sees
            # False and schedules another `_take` (at worst one that finds nothing)
            self._arrival_pending = True
            loop.call_soon_threadsafe(self._take)

    def on_stop(self, timeout: float | None) -> None:
        """Warm: every admitted and waiting job finishes; after `timeout` the rest is abandoned."""
        loop = self._loop
        if loop is None:
            return
        drained = asyncio.run_coroutine_threadsafe(self._drain(), loop)
        try:
            drained.result(timeout)
        except TimeoutError:
            log.warning(
                "asyncio pool: jobs still running at the end of the warm stop; abandoning them",
                running=len(self._running),
                waiting=len(self._waiting),
            )
            self._abandon(loop)
        self._close(loop)

    def on_terminate(self) -> None:
        """Cold: cancel everything now; abandoned jobs are not reported (their messages return)."""
        loop = self._loop
        if loop is None:
            return
        self._abandon(loop)
        self._close(loop)

    def _abandon(self, loop: asyncio.AbstractEventLoop) -> None:
        cancelled = asyncio.run_coroutine_threadsafe(self._cancel_all(), loop)
        with contextlib.suppress(TimeoutError, RuntimeError):
            cancelled.result(TERMINATE_GRACE + 1)

    def _close(self, loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(RuntimeError):  # already closed
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(TERMINATE_GRACE + 1)
        if self._executor is not None:
            # a plain `def` task stuck in a C call cannot be stopped: do not wait for its thread
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._loop = None

    async def _drain(self) -> None:
        assert self._idle is not None
        await self._idle.wait()

    async def _cancel_all(self) -> None:
        self._terminating = True
        self._waiting.clear()
        tasks = [r.task for r in self._running.values() if r.task is not None]
        for running in list(self._running.values()):
            self._interrupt_thread(running, TaskRevokedError)
            if running.task is None:  # a plain `def` job: nothing to await, free its slot
                self._release(running.job)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=TERMINATE_GRACE)

    # -- admission (loop thread only) ------------------------------------------------------------
    def _take(self) -> None:
        """Admit every job that arrived since the last wake-up, in arrival order."""
        self._arrival_pending = False
        arrived = self._arrived
        while arrived:
            self._admit(arrived.popleft())

    def _admit(self, job: Job) -> None:
        if self._terminating:
            return
        assert self._idle is not None
        self._idle.clear()
        if len(self._running) < self.concurrency:
            self._launch(job)
        else:
            self._waiting.append(job)

    def _launch(self, job: Job) -> None:
        assert self._loop is not None
        running = _Running(job)
        self._running[job.task_id] = running
        if self.execution.is_async(job) or self._refuse_sync:
            running.task = self._loop.create_task(
                self._drive(running), name=f"millpond:{job.task_id}"
            )
        else:
            self._submit_sync(running)

    def _release(self, job: Job) -> None:
        assert self._idle is not None
        running = self._running.pop(job.task_id, None)
        if running is not None:
            for timer in running.timers:
                timer.cancel()
        while self._waiting and len(self._running) < self.concurrency:
            self._launch(self._waiting.popleft())
        if not self._running and not self._waiting:
            self._idle.set()

    # -- one job (loop thread only) --------------------------------------------------------------
    async def _drive(self, running: _Running) -> None:
        job = running.job
        loop = asyncio.get_running_loop()
        timers: list[asyncio.TimerHandle] = []
        if job.time_limit:
            timers.append(loop.call_later(job.time_limit, self._hard_limit, running))
        outcome: Outcome | None = None
        try:
            if self.execution.is_async(job):
                escaped: list[BaseException] = []
                outcome = await self.execution.run_async(job, _contained(self._guard(job), escaped))
                if escaped:  # the task's own KeyboardInterrupt (or the like): it fails with it
                    children = outcome.children
                    outcome = Outcome.of(escaped[0], runtime=outcome.runtime)
                    outcome.children = children
            else:  # a plain def, and this pool refuses those (others go to `_submit_sync`)
                outcome = _refused(job)
        except asyncio.CancelledError:
            outcome = None  # a limit or terminate_job already reported it, or we are terminating
        except Exception as exc:  # the pool's own failure (execution.run catches the task's)
            outcome = _pool_failed(exc)
        finally:
            for timer in timers:
                timer.cancel()
            # report before releasing the slot: a warm stop returns only after every report
            if outcome is not None and not self._terminating:
                self.complete(job, outcome)
            self._release(job)

    # -- one plain `def` job (submitted on the loop thread, run in an executor thread) ------------
    def _submit_sync(self, running: _Running) -> None:
        assert self._loop is not None
        assert self._executor is not None
        job = running.job
        running.thread = ThreadSlot()
        loop = self._loop
        if job.time_limit:
            running.timers.append(loop.call_later(job.time_limit, self._hard_limit, running))
        if job.soft_time_limit:
            running.timers.append(
                loop.call_later(
                    job.soft_time_limit, self._interrupt_thread, running, SoftTimeLimitExceeded
                )
            )
        try:
            self._executor.submit(self._run_sync, running)
        except RuntimeError as exc:  # the executor is shut down: the pool is stopping
            self.complete(job, _pool_failed(exc))
            self._release(job)

    def _run_sync(self, running: _Running) -> None:
        """In an executor thread: run the job, report it, then hand its slot back to the loop
        (report first: a warm stop returns only after every report)."""
        job = running.job
        assert running.thread is not None
        try:
            try:
                outcome = _run_in_thread(self.execution, job, running.thread)
            except Exception as exc:  # the pool's own failure (execution.run catches the task's)
                outcome = _pool_failed(exc)
            except BaseException as exc:
                # KeyboardInterrupt or a custom BaseException out of the task body (the core
                # lets it through): the executor thread would swallow it and the job would
                # never be reported. The task fails with it, as with any other exception.
                outcome = Outcome.of(exc)
            if not self._terminating:
                self.complete(job, outcome)  # idempotent: a time limit may have reported it
        finally:  # whatever happened, the slot goes back
            self._finished.append(running)
            if not self._finish_pending:
                self._finish_pending = True
                loop = self._loop
                if loop is not None:
                    with contextlib.suppress(RuntimeError):  # the loop closed: nothing to free
                        loop.call_soon_threadsafe(self._reap)

    def _reap(self) -> None:
        """On the loop: free the slots of the plain `def` jobs that ended since the last wake-up."""
        self._finish_pending = False
        finished = self._finished
        while finished:
            running = finished.popleft()
            if self._running.get(running.job.task_id) is running:  # not released at a limit
                self._release(running.job)

    def _guard(self, job: Job) -> Guard | None:
        soft = job.soft_time_limit
        if not soft:
            return None
        message = f"task {job.task_name}[{job.task_id}] passed its soft time limit of {soft:g}s"

        def guard(coro: Coroutine[Any, Any, Any]) -> SoftLimited:
            return SoftLimited(coro, soft, message)

        return guard

    def _hard_limit(self, running: _Running) -> None:
        job = running.job
        self.complete(job, Outcome.hard_timeout(job, "was cancelled"))
        self._stop_job(running, TimeLimitExceeded)

    def _stop_job(self, running: _Running, exc_type: type[BaseException]) -> None:
        self._interrupt_thread(running, exc_type)
        if running.task is not None:
            running.task.cancel()
        elif self._running.get(running.job.task_id) is running:
            # a plain `def` job frees its slot now, as a cancelled coroutine does; its thread
            # ends at the interruption (or when its C call returns) and `_reap` skips it then
            self._release(running.job)

    @staticmethod
    def _interrupt_thread(running: _Running, exc_type: type[BaseException]) -> None:
        if running.thread is not None:
            running.thread.interrupt(exc_type)

    # -- optional capabilities -------------------------------------------------------------------
    def terminate_job(self, task_id: str, signum: int | None = None) -> bool:
        """Report the job REVOKED and cancel it (a waiting job never starts); a coroutine is
        cancelled, not signalled, so `signum` does not apply."""
        loop = self._loop
        if loop is None:
            return False
        with self._lock:
            job = self._active.get(task_id)
        if job is None:
            return False
        revoked = TaskRevokedError(f"task {job.task_name}[{task_id}] was terminated")
        self.complete(job, Outcome.of(revoked, TaskState.REVOKED))
        loop.call_soon_threadsafe(self._revoke, task_id)
        return True

    def _revoke(self, task_id: str) -> None:
        for job in self._waiting:
            if job.task_id == task_id:
                self._waiting.remove(job)
                self._release(job)  # keeps the idle bookkeeping right
                return
        running = self._running.get(task_id)
        if running is not None:
            self._stop_job(running, TaskRevokedError)

    def resize(self, concurrency: int) -> None:
        """Change how many coroutines may run at once; waiting jobs start at once if room grew."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.concurrency = concurrency
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._fill)

    def _fill(self) -> None:
        if self._fixed_threads is None and self.concurrency > self._executor_threads:
            # a bigger executor for plain `def` tasks; the old one's threads finish their jobs
            assert self._loop is not None
            assert self._executor is not None
            old = self._executor
            self._executor_threads = self.concurrency
            self._executor = ThreadPoolExecutor(
                max_workers=self.concurrency, thread_name_prefix="millpond-asyncio-sync"
            )
            self._loop.set_default_executor(self._executor)  # for tasks that use it too
            old.shutdown(wait=False)
        while self._waiting and len(self._running) < self.concurrency:
            self._launch(self._waiting.popleft())


def _run_in_thread(execution: Execution, job: Job, slot: ThreadSlot) -> Outcome:
    """A plain `def` job in an executor thread, with a window in which it may be interrupted."""
    outcome: Outcome | None = None
    while True:
        try:
            if outcome is None:
                slot.arm()
                try:
                    outcome = execution.run(job)
                except BaseException:
                    slot.disarm()  # never leave a finished job's thread open to interruption
                    raise
            slot.disarm()
            return outcome
        except (SoftTimeLimitExceeded, TimeLimitExceeded, TaskRevokedError) as exc:
            # Landed outside the task body (run_job catches everything inside it): the job is
            # over either way; report the interruption if there is no outcome yet, then disarm.
            if outcome is None:
                outcome = Outcome.of(exc, message=str(exc) or type(exc).__name__)


class _Escaped(Exception):
    """Carries a BaseException out of a coroutine task body through the core's `except
    Exception`: asyncio re-raises KeyboardInterrupt and SystemExit out of the event loop, which
    would stop the loop thread and lose every running job."""


def _contained(inner: Guard | None, escaped: list[BaseException]) -> Guard:
    async def contain(coro: Coroutine[Any, Any, Any]) -> Any:
        try:
            return await (inner(coro) if inner is not None else coro)
        except (Exception, SystemExit, asyncio.CancelledError, GeneratorExit):
            raise
        except BaseException as exc:
            escaped.append(exc)
            raise _Escaped(f"{type(exc).__name__}: {exc}") from exc

    return contain


def _pool_failed(exc: Exception) -> Outcome:
    return Outcome.of(exc, message=f"the asyncio pool failed the job: {exc}")


def _refused(job: Job) -> Outcome:
    return Outcome.of(
        NotSupported(
            f"task {job.task_name} is a plain def, and this asyncio pool refuses those "
            "(asyncio.sync_tasks = refuse): make it async def, or set "
            "MILLPOND_ASYNCIO__SYNC_TASKS=thread to run it in a thread"
        )
    )
