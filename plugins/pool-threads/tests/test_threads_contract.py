"""The threads pool: the conformance kit, plus what only threads do (best-effort soft limits)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from millpond.config import plugins
from millpond.config.settings import load_settings
from millpond.contracts.pool import BasePool
from millpond.exceptions import ConfigurationError
from millpond.states import TaskState
from millpond.testing import tasks
from millpond.testing.pool_kit import Outcomes, PoolContract, Runner, kit_executor, make_job
from millpond_pool_threads import SECTION, ThreadPool


class TestThreadsContract(PoolContract):
    @pytest.fixture
    def pool_name(self) -> str:
        return "threads"

    @pytest.fixture
    def concurrency(self) -> int:
        return 4


def test_default_concurrency_is_cpus_plus_four_capped_at_32() -> None:
    assert ThreadPool.default_concurrency() == min(32, (os.cpu_count() or 1) + 4)


def test_declares_what_a_thread_can_honestly_do() -> None:
    caps = ThreadPool.capabilities
    assert caps.soft_time_limit
    assert caps.resize
    assert caps.concurrent
    assert not caps.hard_time_limit
    assert not caps.terminate_job


def test_settings_section_is_validated() -> None:
    settings = load_settings(env={"MILLPOND_THREADS__STACK_SIZE": "512"})
    assert dict(settings.section(SECTION)) == {"stack_size": 512}
    with pytest.raises(ConfigurationError, match=r"threads\.stack_size.*too small"):
        load_settings(env={"MILLPOND_THREADS__STACK_SIZE": "8"}).section(SECTION)
    with pytest.raises(ConfigurationError, match=r"unknown setting 'threads\.stack' \(options\)"):
        ThreadPool(1, Outcomes(), {"stack": 1}, execution=kit_executor(tasks.app))
    assert plugins.settings_section("threads") is SECTION  # found by the pool's name


@pytest.fixture
def threads_pool() -> Any:
    made: list[BasePool] = []

    def make(concurrency: int, outcomes: Outcomes, **options: Any) -> BasePool:
        pool = ThreadPool(concurrency, outcomes, options, execution=kit_executor(tasks.app))
        made.append(pool)
        pool.start()
        return pool

    yield make
    for pool in made:
        pool.terminate()


def test_stack_size_option_applies_to_pool_threads(threads_pool: Callable[..., BasePool]) -> None:
    outcomes = Outcomes()
    pool = threads_pool(2, outcomes, stack_size=256)
    runner = Runner(pool, outcomes, 10)
    assert pool.config.stack_size == 256  # type: ignore[attr-defined]
    assert runner.run("add", 1, 2).result == 3
    assert threading.stack_size() == 0, "the process-wide default stack size was not restored"


def test_soft_limit_cannot_interrupt_one_long_blocking_call(
    threads_pool: Callable[..., BasePool],
) -> None:
    """The documented limitation: the soft limit lands only when the blocking C call returns."""
    app = tasks.app
    if "tests.block" not in app.tasks:
        app.task(name="tests.block")(time.sleep)  # one C call, no bytecode boundary inside
    outcomes = Outcomes()
    runner = Runner(threads_pool(1, outcomes), outcomes, 10)
    started = time.monotonic()
    outcome = runner.run("tests.block", 0.3, soft_time_limit=0.1)
    elapsed = time.monotonic() - started
    assert (outcome.state, outcome.exc_type) == (TaskState.FAILURE, "SoftTimeLimitExceeded"), (
        outcome
    )
    assert elapsed >= 0.3, "the sleep was interrupted inside the C call"
    assert "soft time limit" in outcome.exc_message


def test_many_soft_limits_never_fire_into_the_wrong_task(
    threads_pool: Callable[..., BasePool],
) -> None:
    """Limits armed for tasks that ended in time must not land in later tasks or pool code."""
    outcomes = Outcomes()
    pool = threads_pool(4, outcomes)
    runner = Runner(pool, outcomes, 20)
    jobs = [make_job("kit.sleep", 0.002 * (i % 5), soft_time_limit=0.004) for i in range(200)]
    results = runner.run_all(jobs, timeout=30)
    for _job, outcome in zip(jobs, results, strict=True):
        assert outcome.state in (TaskState.SUCCESS, TaskState.FAILURE), outcome
        if outcome.state == TaskState.FAILURE:
            assert outcome.exc_type == "SoftTimeLimitExceeded", outcome
    assert all(outcomes.calls[j.task_id] == 1 for j in jobs)
    # the pool is still healthy and nothing is pending in any thread
    check = [make_job("kit.sleep", 0.05) for _ in range(4)]
    assert [o.state for o in runner.run_all(check)] == [TaskState.SUCCESS] * 4


def _interrupt() -> None:
    raise KeyboardInterrupt("raised by the task itself")


def test_a_task_raising_keyboard_interrupt_fails_and_keeps_its_thread(
    threads_pool: Callable[..., BasePool],
) -> None:
    """A BaseException out of a task body (KeyboardInterrupt, GeneratorExit, a custom one) must
    complete its job and leave the thread serving: it used to end the thread silently, so the
    job never completed (its message held until the worker stopped) and the pool lost a unit."""
    app = tasks.app
    if "tests.interrupt" not in app.tasks:
        app.task(name="tests.interrupt")(_interrupt)
    outcomes = Outcomes()
    runner = Runner(threads_pool(1, outcomes), outcomes, 5)
    outcome = runner.run("tests.interrupt")
    assert (outcome.state, outcome.exc_type) == (TaskState.FAILURE, "KeyboardInterrupt"), outcome
    assert "raised by the task itself" in outcome.exc_message
    assert runner.run("add", 1, 2).result == 3, "the pool's only thread is gone"
