"""The pool conformance kit: one pytest class every pool plugin's test module subclasses.

    from millpond.testing.pool_kit import PoolContract

    class TestThreadsContract(PoolContract):
        @pytest.fixture
        def pool_name(self) -> str:
            return "threads"

The kit exists so that "works with millpond" means the same thing for every pool: results and
errors come back whole, N units really run N jobs at once, warm stops finish and cold stops do not
wait, every capability a pool declares works and every one it does not declare says so
(`NotSupported`), each job sees its own trace and log context and nothing of the job before it,
and the worker warns about limits the pool cannot enforce. The class has no `Test` prefix, so
pytest collects it only through a subclass.

Nothing here assumes threads or processes: the kit talks to the pool only through `BasePool`, and
the probes are tasks (`millpond.testing.tasks`) that report what they saw. Parallelism is checked
with a TCP gate (`Gate`), which works the same across threads, forked children and greenlets.

Fixtures a subclass provides or overrides (the names are stable):

* `pool_name`: the `millpond.pools` entry-point name; or override `pool_class` directly.
* `pool_options`: the options mapping given to the pool (default `{}`).
* `concurrency`: the size of the default `pool` (default 3, or 1 for a non-concurrent pool).

Class attribute `prompt` is the bound, in seconds, for anything that should happen "at once".

Fixtures the kit gives: `pool` (started, with `outcomes` recording its completions), `make_pool()`
(another started pool; every pool is terminated at teardown), `outcomes`, `runner` (submit jobs
and wait for them the way the worker does), `gates` (open `Gate`s, closed at teardown) and the
session-wide `kit_tracing` (an SDK tracer provider with an in-memory exporter).
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

import pytest

from millpond.config import plugins
from millpond.consume.execute import Executor
from millpond.contracts.hooks import HookChain
from millpond.contracts.pool import BasePool, Capabilities, Job, Outcome
from millpond.exceptions import NotSupported
from millpond.produce.app import Millpond
from millpond.states import TaskState
from millpond.testing import tasks
from millpond_cli.logs import LogContextHooks
from millpond_tracing.hooks import TracingHooks

__all__ = [
    "Gate",
    "Outcomes",
    "PoolContract",
    "Runner",
    "kit_executor",
    "make_job",
    "parse_traceparent",
]


# -- helpers (public: plugin tests use them for their own pool-specific tests) -------------------


def make_job(task_name: str, *args: Any, **options: Any) -> Job:
    """A job for a kit task (`"kit.add"`, or the short `"add"`), with a fresh task id.

    Keyword options are Job fields (`time_limit`, `soft_time_limit`, `retries`, `queue`...);
    `kwargs=` gives the task's keyword arguments.
    """
    name = task_name if "." in task_name else f"kit.{task_name}"
    kwargs = options.pop("kwargs", {})
    options.setdefault("queue", "kit")
    return Job(
        task_id=str(uuid.uuid4()), task_name=name, args=tuple(args), kwargs=kwargs, **options
    )


def parse_traceparent(job_or_header: Job | str | None) -> tuple[str, str]:
    """(trace_id, span_id) of a W3C traceparent header, or of the one the tracing hook put in a
    job's carrier."""
    traceparent = (
        (job_or_header.carrier or {}).get("traceparent")
        if isinstance(job_or_header, Job)
        else job_or_header
    )
    assert traceparent, "the job has no traceparent: the pool's apply_async did not trace it"
    _version, trace_id, span_id, _flags = traceparent.split("-")
    return trace_id, span_id


class Outcomes:
    """Every completion a pool reports, with bounded waits on them (thread-safe).

    Use an instance as the pool's `on_complete`. It also counts calls per task id, so a test can
    check that each job completed exactly once.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._outcomes: dict[str, Outcome] = {}
        self.calls: Counter[str] = Counter()
        self.order: list[str] = []

    def __call__(self, job: Job, outcome: Outcome) -> None:
        with self._cond:
            self.calls[job.task_id] += 1
            self._outcomes.setdefault(job.task_id, outcome)
            self.order.append(job.task_id)
            self._cond.notify_all()

    def get(self, task_id: str) -> Outcome | None:
        with self._cond:
            return self._outcomes.get(task_id)

    def __len__(self) -> int:
        with self._cond:
            return len(self._outcomes)

    def wait_until(
        self, predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.25
    ) -> Any:
        """Wait (at most `timeout` s) until `predicate()` is true.

        It is re-checked on each completion and at least every `poll` seconds (for conditions
        that change without a completion, such as a job becoming active).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
                self._cond.wait(min(left, poll))

    def wait(self, job: Job | str, timeout: float) -> Outcome:
        task_id = job if isinstance(job, str) else job.task_id
        name = task_id if isinstance(job, str) else f"{job.task_name}[{task_id}]"
        outcome: Outcome = self.wait_until(
            lambda: self._outcomes.get(task_id), timeout, f"the outcome of {name}"
        )
        return outcome

    def wait_all(self, jobs: Iterable[Job], timeout: float) -> list[Outcome]:
        jobs = list(jobs)
        deadline = time.monotonic() + timeout

        def missing() -> list[str]:
            return [j.task_id for j in jobs if j.task_id not in self._outcomes]

        self.wait_until(
            lambda: not missing(),
            timeout,
            f"the outcomes of {len(jobs)} jobs (missing: {len(missing())})",
        )
        assert time.monotonic() <= deadline + 1
        return [self._outcomes[j.task_id] for j in jobs]


class Runner:
    """Feeds a pool the way the worker does: a job only while a unit is free.

    A pool that runs jobs inline (`capabilities.concurrent` False, like solo) blocks its caller,
    so the runner calls its `apply_async` from a helper thread, as if it were the worker loop.
    """

    def __init__(self, pool: BasePool, outcomes: Outcomes, prompt: float) -> None:
        self.pool = pool
        self.outcomes = outcomes
        self.prompt = prompt
        self._threads: list[threading.Thread] = []

    def submit(self, job: Job) -> Job:
        pool = self.pool
        assert pool.active < pool.capacity, (
            f"the kit tried to hand a job to a full pool ({pool.active} of {pool.capacity} "
            "active): the worker never does that"
        )
        if pool.capabilities.concurrent:
            pool.apply_async(job)
            return job
        thread = threading.Thread(
            target=pool.apply_async, args=(job,), daemon=True, name=f"kit-inline-{job.task_id[:8]}"
        )
        self._threads.append(thread)
        thread.start()
        # the job counts as active only once the helper thread is inside apply_async
        self.outcomes.wait_until(
            lambda: (
                self.outcomes.get(job.task_id) is not None
                or any(j.task_id == job.task_id for j in pool.active_jobs())
            ),
            self.prompt,
            f"the {pool.name} pool to take {job.task_name}[{job.task_id}]",
            poll=0.001,
        )
        return job

    def wait_free(self, timeout: float | None = None) -> None:
        pool = self.pool
        self.outcomes.wait_until(
            lambda: pool.active < pool.capacity,
            timeout or self.prompt,
            f"a free unit in the {pool.name} pool ({pool.active} active)",
        )

    def run(
        self, task_name: str, *args: Any, timeout: float | None = None, **options: Any
    ) -> Outcome:
        job = self.submit(make_job(task_name, *args, **options))
        return self.outcomes.wait(job, timeout or self.prompt)

    def run_all(self, jobs: Iterable[Job], timeout: float | None = None) -> list[Outcome]:
        jobs = list(jobs)
        for job in jobs:
            self.wait_free(timeout)
            self.submit(job)
        return self.outcomes.wait_all(jobs, timeout or self.prompt)

    def join(self, timeout: float) -> None:
        for thread in self._threads:
            thread.join(timeout)


class Gate:
    """A TCP rendezvous point for `kit.gate` tasks, in whatever unit they run.

    Each arriving task sends its process id and waits. The gate opens when `open()` is called or,
    with `open_at=N`, as soon as N tasks are waiting at once; once open, latecomers pass at once.
    `close()` releases everyone still waiting (their task returns "closed").
    """

    def __init__(self, open_at: int | None = None) -> None:
        self.open_at = open_at
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._cond = threading.Condition()
        self._waiting: list[socket.socket] = []
        self._buffers: dict[socket.socket, bytes] = {}
        self.arrivals: list[int] = []
        self.is_open = False
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="kit-gate", daemon=True)
        self._thread.start()

    def open(self) -> None:
        with self._cond:
            self.is_open = True
        self._wake_w.send(b"o")

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self._wake_w.send(b"c")
        self._thread.join(5)
        for sock in (self._wake_r, self._wake_w):
            sock.close()

    def wait_arrivals(self, count: int, timeout: float) -> list[int]:
        """Wait until `count` tasks have arrived; returns their process ids in arrival order."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.arrivals) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"only {len(self.arrivals)} of {count} tasks reached the gate within "
                        f"{timeout:g}s"
                    )
                self._cond.wait(left)
            return list(self.arrivals[:count])

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        try:
            while True:
                for key, _ in self._selector.select():
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._wake_r.recv(64)
                    else:
                        self._read(key.fileobj)  # type: ignore[arg-type]
                with self._cond:
                    closed, release = self._closed, self.is_open
                if closed:
                    return
                if release:
                    self._release()
        finally:
            for sock in [*self._waiting, *self._buffers]:
                sock.close()
            self._selector.close()
            self._listener.close()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(True)
        self._buffers[conn] = b""
        self._selector.register(conn, selectors.EVENT_READ, "conn")

    def _read(self, conn: socket.socket) -> None:
        data = conn.recv(64)
        if not data:  # the task gave up (its own timeout, or it was killed)
            self._selector.unregister(conn)
            self._buffers.pop(conn, None)
            if conn in self._waiting:
                self._waiting.remove(conn)
            conn.close()
            return
        buffered = self._buffers.get(conn, b"") + data
        if b"\n" not in buffered:
            self._buffers[conn] = buffered
            return
        self._buffers.pop(conn, None)
        pid = int(buffered.split(b"\n", 1)[0] or 0)
        with self._cond:
            self.arrivals.append(pid)
            self._waiting.append(conn)
            if self.open_at is not None and len(self._waiting) >= self.open_at:
                self.is_open = True
            self._cond.notify_all()

    def _release(self) -> None:
        for conn in self._waiting:
            try:
                conn.sendall(b"!")
            except OSError:
                pass
        # keep them registered: their close (EOF) is read and cleaned up above
        self._waiting = []


class _LogRecorder:
    """Stands in for the worker module's structlog logger to record what it warns about."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def _record(self, level: str, event: str, **kw: Any) -> None:
        with self._lock:
            self.records.append((level, event, kw))

    def debug(self, event: str, **kw: Any) -> None:
        self._record("debug", event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        self._record("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._record("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._record("error", event, **kw)

    def exception(self, event: str, **kw: Any) -> None:
        self._record("error", event, **kw)

    def warnings(self) -> list[str]:
        with self._lock:
            return [event for level, event, _ in self.records if level == "warning"]


def kit_executor(app: Millpond) -> Executor:
    """An `Executor` for `app` with the tracing and log-context hooks only: what a pool is
    handed, for tests that drive a pool without a worker."""
    return Executor(app, HookChain([TracingHooks(), LogContextHooks()]))


def install_tracing() -> Any:
    """An in-memory span exporter on this process's (single) SDK tracer provider.

    OpenTelemetry installs a tracer provider once per process; this installs one if there is
    none, or adds the exporter to the one already there, then turns millpond's tracing on.
    """
    from millpond.testing.otel import memory_exporter

    return memory_exporter()


# -- the contract ----------------------------------------------------------------------------------


class PoolContract:
    """The behaviour every millpond pool must have. Subclass it in a `Test...` class."""

    #: seconds allowed for anything that should be prompt (a stop, a kill, a soft limit)
    prompt: ClassVar[float] = 10.0

    # -- fixtures a subclass provides or overrides ----------------------------------------------
    @pytest.fixture
    def pool_name(self) -> str:
        raise pytest.UsageError(
            f"{type(self).__name__} must provide a `pool_name` fixture (the millpond.pools "
            "entry-point name) or override `pool_class`"
        )

    @pytest.fixture
    def pool_class(self, pool_name: str) -> type[BasePool]:
        cls: type[BasePool] = plugins.load(plugins.POOLS, pool_name)
        return cls

    @pytest.fixture
    def pool_options(self) -> dict[str, Any]:
        return {}

    @pytest.fixture
    def concurrency(self, pool_class: type[BasePool]) -> int:
        return 3 if pool_class.capabilities.concurrent else 1

    # -- fixtures the kit gives -----------------------------------------------------------------
    @pytest.fixture(scope="session")
    @classmethod
    def kit_tracing(cls) -> Any:
        return install_tracing()

    @pytest.fixture
    def kit_app(self) -> Millpond:
        return tasks.app

    @pytest.fixture
    def kit_execution(self, kit_app: Millpond) -> Executor:
        """What the worker hands a pool: the kit app's tasks with the tracing and log-context
        hooks (whatever else is installed stays out of the kit)."""
        return kit_executor(kit_app)

    @pytest.fixture
    def outcomes(self) -> Outcomes:
        return Outcomes()

    @pytest.fixture
    def make_pool(
        self,
        pool_class: type[BasePool],
        pool_options: dict[str, Any],
        kit_execution: Executor,
    ) -> Iterator[Callable[..., BasePool]]:
        made: list[BasePool] = []

        def make(
            concurrency: int,
            on_complete: Callable[[Job, Outcome], None],
            options: Mapping[str, Any] | None = None,
        ) -> BasePool:
            merged = {**pool_options, **(options or {})}
            pool = pool_class(concurrency, on_complete, merged, execution=kit_execution)
            made.append(pool)
            pool.start()
            return pool

        yield make
        for pool in reversed(made):
            pool.terminate()

    @pytest.fixture
    def pool(
        self, make_pool: Callable[..., BasePool], concurrency: int, outcomes: Outcomes
    ) -> BasePool:
        return make_pool(concurrency, outcomes)

    @pytest.fixture
    def runner(self, pool: BasePool, outcomes: Outcomes) -> Iterator[Runner]:
        run = Runner(pool, outcomes, self.prompt)
        yield run
        run.join(self.prompt)

    @pytest.fixture
    def gates(self) -> Iterator[Callable[..., Gate]]:
        opened: list[Gate] = []

        def gate(open_at: int | None = None) -> Gate:
            g = Gate(open_at)
            opened.append(g)
            return g

        yield gate
        for g in opened:
            g.close()

    # -- declarations ---------------------------------------------------------------------------
    def test_declares_name_and_capabilities(self, pool_class: type[BasePool]) -> None:
        assert pool_class.name, "a pool must set `name` (what users type after --pool)"
        assert isinstance(pool_class.capabilities, Capabilities)
        assert pool_class.default_concurrency() >= 1
        if not pool_class.capabilities.concurrent:
            assert pool_class.default_concurrency() == 1

    def test_refuses_a_concurrency_below_one(
        self, pool_class: type[BasePool], outcomes: Outcomes, kit_execution: Executor
    ) -> None:
        with pytest.raises(ValueError, match="concurrency"):
            pool_class(0, outcomes, execution=kit_execution)

    # -- results --------------------------------------------------------------------------------
    def test_result_comes_back(self, runner: Runner) -> None:
        outcome = runner.run("add", 2, 3)
        assert outcome.state == TaskState.SUCCESS, outcome
        assert outcome.result == 5
        assert outcome.runtime >= 0

    def test_keyword_arguments_reach_the_task(self, runner: Runner) -> None:
        outcome = runner.run("add", 2, kwargs={"y": 40})
        assert (outcome.state, outcome.result) == (TaskState.SUCCESS, 42), outcome

    def test_exception_comes_back_with_type_message_and_traceback(self, runner: Runner) -> None:
        outcome = runner.run("fail", "the disk is full")
        assert outcome.state == TaskState.FAILURE, outcome
        assert outcome.exc_type == "KitError"
        assert outcome.exc_module == "millpond.testing.tasks"
        assert outcome.exc_message == "the disk is full"
        assert outcome.traceback is not None
        assert "KitError: the disk is full" in outcome.traceback
        assert "in fail" in outcome.traceback

    def test_unknown_task_fails_cleanly(self, runner: Runner) -> None:
        outcome = runner.run("kit.no_such_task")
        assert outcome.state == TaskState.FAILURE, outcome
        assert outcome.exc_type == "UnknownTask"
        assert "kit.no_such_task" in outcome.exc_message

    def test_sys_exit_in_a_task_fails_the_task_not_the_unit(self, runner: Runner) -> None:
        outcome = runner.run("leave", 3)
        assert (outcome.state, outcome.exc_type) == (TaskState.FAILURE, "SystemExit"), outcome
        assert runner.run("add", 1, 1).result == 2

    def test_every_job_completes_exactly_once(self, runner: Runner, outcomes: Outcomes) -> None:
        jobs = [make_job("add", i, i) for i in range(60)]
        results = runner.run_all(jobs, timeout=30)
        assert [o.state for o in results] == [TaskState.SUCCESS] * len(jobs)
        assert [o.result for o in results] == [2 * i for i in range(60)]
        assert all(outcomes.calls[j.task_id] == 1 for j in jobs), outcomes.calls
        assert runner.pool.active == 0

    # -- parallelism and lifecycle --------------------------------------------------------------
    def test_runs_concurrency_jobs_at_once(
        self, runner: Runner, concurrency: int, gates: Callable[..., Gate]
    ) -> None:
        gate = gates(open_at=concurrency)
        jobs = [runner.submit(make_job("gate", gate.port, self.prompt)) for _ in range(concurrency)]
        results = runner.outcomes.wait_all(jobs, self.prompt * 2)
        assert [o.state for o in results] == [TaskState.SUCCESS] * concurrency, [
            o.exc_message for o in results
        ]
        assert [o.result for o in results] == ["released"] * concurrency

    def test_warm_stop_finishes_running_jobs(
        self, runner: Runner, pool: BasePool, concurrency: int, gates: Callable[..., Gate]
    ) -> None:
        gate = gates()
        jobs = [runner.submit(make_job("gate", gate.port, self.prompt)) for _ in range(concurrency)]
        gate.wait_arrivals(concurrency, self.prompt)
        stopper = threading.Thread(target=pool.stop, args=(self.prompt * 2,), name="kit-stop")
        stopper.start()
        gate.open()
        stopper.join(self.prompt * 3)
        assert not stopper.is_alive(), "the warm stop did not return after its jobs finished"
        if pool.capabilities.concurrent:
            # stop() returns only once the running jobs have reported
            results: list[Outcome | None] = [runner.outcomes.get(j.task_id) for j in jobs]
        else:
            results = list(runner.outcomes.wait_all(jobs, self.prompt))
        assert all(o is not None and o.state == TaskState.SUCCESS for o in results), results

    def test_cold_terminate_returns_promptly_while_a_job_runs(
        self, runner: Runner, pool: BasePool, gates: Callable[..., Gate]
    ) -> None:
        gate = gates()
        runner.submit(make_job("gate", gate.port, 60.0))
        gate.wait_arrivals(1, self.prompt)
        started = time.monotonic()
        pool.terminate()
        elapsed = time.monotonic() - started
        assert elapsed < self.prompt / 2, f"terminate() took {elapsed:.2f}s with a job running"

    def test_stop_when_idle_is_prompt_and_idempotent(self, runner: Runner, pool: BasePool) -> None:
        assert runner.run("add", 1, 2).result == 3
        started = time.monotonic()
        pool.stop(self.prompt)
        pool.stop(self.prompt)
        assert time.monotonic() - started < self.prompt / 2

    # -- capabilities ---------------------------------------------------------------------------
    def test_hard_time_limit(self, runner: Runner, pool: BasePool) -> None:
        if not pool.capabilities.hard_time_limit:
            pytest.skip(f"the {pool.name} pool does not declare hard_time_limit")
        started = time.monotonic()
        outcome = runner.run("sleep", 60.0, time_limit=0.5, timeout=self.prompt + 0.5)
        elapsed = time.monotonic() - started
        assert outcome.state == TaskState.TIMEOUT, outcome
        assert outcome.exc_type == "TimeLimitExceeded"
        assert elapsed < self.prompt, f"the hard limit took {elapsed:.2f}s to stop the task"
        runner.wait_free()
        assert runner.run("add", 2, 2).result == 4, "the pool did not recover its unit"

    def test_soft_time_limit(self, runner: Runner, pool: BasePool) -> None:
        if not pool.capabilities.soft_time_limit:
            pytest.skip(f"the {pool.name} pool does not declare soft_time_limit")
        started = time.monotonic()
        outcome = runner.run("soft_cleanup", 60.0, soft_time_limit=0.3)
        assert (outcome.state, outcome.result) == (TaskState.SUCCESS, "cleaned up"), outcome
        assert time.monotonic() - started < self.prompt
        # uncaught, it fails the task with the soft-limit error
        outcome = runner.run("sleep", 60.0, soft_time_limit=0.2)
        assert (outcome.state, outcome.exc_type) == (TaskState.FAILURE, "SoftTimeLimitExceeded"), (
            outcome
        )
        assert runner.run("add", 3, 3).result == 6

    def test_soft_time_limit_not_reached_changes_nothing(
        self, runner: Runner, pool: BasePool
    ) -> None:
        if not pool.capabilities.soft_time_limit:
            pytest.skip(f"the {pool.name} pool does not declare soft_time_limit")
        jobs = [make_job("sleep", 0.01, soft_time_limit=0.3) for _ in range(6)]
        assert all(o.state == TaskState.SUCCESS for o in runner.run_all(jobs))
        # a limit armed for a finished task must not fire into the next one
        outcome = runner.run("sleep", 0.6)
        assert outcome.state == TaskState.SUCCESS, outcome

    def test_terminate_job(
        self, runner: Runner, pool: BasePool, gates: Callable[..., Gate]
    ) -> None:
        if not pool.capabilities.terminate_job:
            with pytest.raises(NotSupported, match=pool.name):
                pool.terminate_job(str(uuid.uuid4()))
            return
        gate = gates()
        job = runner.submit(make_job("gate", gate.port, 60.0))
        gate.wait_arrivals(1, self.prompt)
        assert pool.terminate_job(job.task_id) is True
        outcome = runner.outcomes.wait(job, self.prompt)
        assert outcome.state == TaskState.REVOKED, outcome
        assert pool.terminate_job(str(uuid.uuid4())) is False
        runner.wait_free()
        assert runner.run("add", 4, 4).result == 8, "the pool did not recover its unit"

    def test_resize(
        self,
        make_pool: Callable[..., BasePool],
        outcomes: Outcomes,
        pool_class: type[BasePool],
        gates: Callable[..., Gate],
    ) -> None:
        pool = make_pool(1, outcomes)
        if not pool_class.capabilities.resize:
            with pytest.raises(NotSupported, match=pool.name):
                pool.resize(2)
            return
        runner = Runner(pool, outcomes, self.prompt)
        pool.resize(3)
        assert pool.concurrency == 3
        gate = gates(open_at=3)
        jobs = [runner.submit(make_job("gate", gate.port, self.prompt)) for _ in range(3)]
        results = outcomes.wait_all(jobs, self.prompt * 2)
        assert [o.result for o in results] == ["released"] * 3, [o.exc_message for o in results]
        pool.resize(1)
        assert pool.concurrency == 1
        runner.wait_free()
        assert runner.run("add", 5, 5).result == 10
        with pytest.raises(ValueError, match="at least 1"):
            pool.resize(0)

    # -- context --------------------------------------------------------------------------------
    def test_trace_and_log_context_follow_each_job(
        self, kit_tracing: Any, runner: Runner, concurrency: int
    ) -> None:
        jobs = [make_job("context", retries=i % 3) for i in range(max(8, 4 * concurrency))]
        results = runner.run_all(jobs, timeout=30)
        seen_traces = set()
        for job, outcome in zip(jobs, results, strict=True):
            assert outcome.state == TaskState.SUCCESS, outcome
            got = outcome.result
            trace_id, process_span_id = parse_traceparent(job)
            assert got["trace_id"] == trace_id, "the task body is not in the job's trace"
            assert got["span_id"] == process_span_id, (
                "the task body does not run inside the job's process span"
            )
            log = got["log"]
            assert log["task_id"] == job.task_id, "the log context carries another task's id"
            assert log["task_name"] == job.task_name
            assert log["retries"] == job.retries
            assert (log["trace_id"], log["span_id"]) == (trace_id, process_span_id)
            request = got["request"]
            assert request is not None, "current_request() is None inside the task"
            assert (request["id"], request["task"], request["retries"]) == (
                job.task_id,
                job.task_name,
                job.retries,
            )
            seen_traces.add(trace_id)
        assert len(seen_traces) == len(jobs)
        exported = {
            format(s.context.span_id, "016x"): s
            for s in kit_tracing.get_finished_spans()
            if s.name == "process kit"
        }
        for job in jobs:
            span = exported.get(parse_traceparent(job)[1])
            assert span is not None, "the job's process span was not ended by complete()"
            assert span.attributes["millpond.task.state"] == TaskState.SUCCESS

    def test_nothing_leaks_into_the_next_task_on_a_reused_unit(
        self, make_pool: Callable[..., BasePool], outcomes: Outcomes
    ) -> None:
        pool = make_pool(1, outcomes)
        runner = Runner(pool, outcomes, self.prompt)
        first = runner.run("pollute")
        assert first.state == TaskState.SUCCESS, first
        assert first.result["leak"] == "polluted"
        for _ in range(3):
            job = make_job("context")
            outcome = runner.outcomes.wait(runner.submit(job), self.prompt)
            got = outcome.result
            assert got["leak"] is None, "a contextvar set by the previous task leaked"
            assert "kit_leak" not in got["log"], "a log key bound by the previous task leaked"
            assert got["log"]["task_id"] == job.task_id
            assert got["request"]["id"] == job.task_id
        runner.join(self.prompt)

    # -- the worker's view ----------------------------------------------------------------------
    def test_worker_warns_about_limits_the_pool_cannot_enforce(
        self,
        pool_class: type[BasePool],
        concurrency: int,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        from millpond.config.settings import load_settings
        from millpond.consume import receive as receive_module
        from millpond.consume import worker as worker_module

        queue = f"kit-{uuid.uuid4().hex[:10]}"
        app = tasks.register(
            Millpond(
                "kit-worker", broker_url=f"memory://{queue}", queues=[queue], default_queue=queue
            )
        )
        app.task(name="kit.limited", time_limit=60.0, soft_time_limit=30.0)(tasks.add)
        recorder = _LogRecorder()
        monkeypatch.setattr(worker_module, "log", recorder)
        monkeypatch.setattr(receive_module, "log", recorder)
        load = plugins.load
        monkeypatch.setattr(
            plugins,
            "load",
            lambda group, name: pool_class if group == plugins.POOLS else load(group, name),
        )
        settings = load_settings(
            {"pool": pool_class.name or "kit", "concurrency": concurrency},
            env={},
            code=app.code_config,
        )
        worker = worker_module.Worker(app, settings=settings)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                worker.run()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, name="kit-worker", daemon=True)
        thread.start()
        try:
            assert worker.ready.wait(self.prompt) or errors, "the worker did not start"
            assert not errors, errors
            limited = app.tasks["kit.limited"].delay(2, 3)
            sent = app.send_task("kit.add", (4, 5), time_limit=50.0, soft_time_limit=40.0)
            assert limited.get(timeout=self.prompt) == 5
            assert sent.get(timeout=self.prompt) == 9
        finally:
            worker.stop()
            thread.join(self.prompt * 2)
            app.close()
        assert not thread.is_alive(), "the worker did not stop"
        assert not errors, errors
        caps = pool_class.capabilities
        warnings = "\n".join(recorder.warnings())
        for option, declared in (
            ("time_limit", caps.hard_time_limit),
            ("soft_time_limit", caps.soft_time_limit),
        ):
            if declared:
                assert f"cannot enforce {option};" not in warnings, warnings
                assert f"kit.limited: {option}=" not in warnings, warnings
            else:
                assert f"kit.limited: {option}=" in warnings, (
                    f"no start-up warning about {option} on a pool without it:\n{warnings}"
                )
                assert f"cannot enforce {option}; kit.add runs without it" in warnings, (
                    f"no per-task warning about {option} on a pool without it:\n{warnings}"
                )
