"""The asyncio pool: the conformance kit (its tasks are plain `def`, run in the executor), then
what only this pool does: `async def` tasks on one event loop, limits as cancellations, context
per coroutine."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import async_tasks
import pytest

from millpond.config import plugins
from millpond.config.settings import load_settings
from millpond.contracts.pool import BasePool, Job
from millpond.exceptions import ConfigurationError
from millpond.states import TaskState
from millpond.testing.pool_kit import Outcomes, PoolContract, kit_executor, parse_traceparent
from millpond_pool_asyncio import SETTINGS, AsyncioPool

PROMPT = 10.0


class TestAsyncioContract(PoolContract):
    @pytest.fixture
    def pool_name(self) -> str:
        return "asyncio"

    @pytest.fixture
    def concurrency(self) -> int:
        return 4


def job(name: str, *args: Any, **options: Any) -> Job:
    return Job(
        task_id=str(uuid.uuid4()), task_name=name, args=args, kwargs={}, queue="aio", **options
    )


@pytest.fixture
def outcomes() -> Outcomes:
    return Outcomes()


@pytest.fixture
def make_pool(outcomes: Outcomes) -> Iterator[Callable[..., AsyncioPool]]:
    made: list[AsyncioPool] = []

    def make(concurrency: int = 4, **options: Any) -> AsyncioPool:
        async_tasks.reset()
        pool = AsyncioPool(concurrency, outcomes, options, execution=kit_executor(async_tasks.app))
        made.append(pool)
        pool.start()
        return pool

    yield make
    for pool in made:
        pool.terminate()


def run(pool: BasePool, outcomes: Outcomes, j: Job, timeout: float = PROMPT) -> Any:
    pool.apply_async(j)
    return outcomes.wait(j, timeout)


def test_async_result_and_error_come_back(make_pool: Any, outcomes: Outcomes) -> None:
    pool = make_pool()
    assert run(pool, outcomes, job("aio.add", 2, 3)).result == 5
    failed = run(pool, outcomes, job("aio.fail", "no such shelf"))
    assert (failed.state, failed.exc_type, failed.exc_message) == (
        TaskState.FAILURE,
        "LookupError",
        "no such shelf",
    )
    assert "in fail" in failed.traceback


def test_at_most_concurrency_coroutines_run_at_once(make_pool: Any, outcomes: Outcomes) -> None:
    pool = make_pool(concurrency=5)
    jobs = [job("aio.nap", 0.05) for _ in range(23)]
    started = time.monotonic()
    for j in jobs:  # more than the limit at once: the pool holds the rest back itself
        pool.apply_async(j)
    results = outcomes.wait_all(jobs, PROMPT)
    assert all(o.state == TaskState.SUCCESS for o in results), results
    assert async_tasks.RUNNING["peak"] == 5, async_tasks.RUNNING
    # 23 naps of 50 ms, 5 at a time: 5 rounds, far from 23 in a row
    assert time.monotonic() - started < 23 * 0.05


def test_resize_changes_the_limit_of_a_running_pool(make_pool: Any, outcomes: Outcomes) -> None:
    pool = make_pool(concurrency=2)
    pool.resize(8)
    jobs = [job("aio.nap", 0.1) for _ in range(8)]
    for j in jobs:
        pool.apply_async(j)
    outcomes.wait_all(jobs, PROMPT)
    assert async_tasks.RUNNING["peak"] == 8


def test_soft_limit_is_raised_at_the_await_and_can_be_caught(
    make_pool: Any, outcomes: Outcomes
) -> None:
    pool = make_pool()
    started = time.monotonic()
    caught = run(pool, outcomes, job("aio.soft_cleanup", 30, soft_time_limit=0.2))
    assert (caught.state, caught.result) == (TaskState.SUCCESS, "cleaned up"), caught
    assert time.monotonic() - started < 2
    uncaught = run(pool, outcomes, job("aio.nap", 30, soft_time_limit=0.2))
    assert (uncaught.state, uncaught.exc_type) == (TaskState.FAILURE, "SoftTimeLimitExceeded"), (
        uncaught
    )
    assert "soft time limit of 0.2s" in uncaught.exc_message


def test_soft_limit_not_reached_changes_nothing(make_pool: Any, outcomes: Outcomes) -> None:
    pool = make_pool()
    quick = [job("aio.nap", 0.01, soft_time_limit=0.2) for _ in range(10)]
    for j in quick:
        pool.apply_async(j)
    assert all(o.state == TaskState.SUCCESS for o in outcomes.wait_all(quick, PROMPT))
    # the timers of finished tasks are gone: a later, longer task is not interrupted
    assert run(pool, outcomes, job("aio.nap", 0.4)).state == TaskState.SUCCESS


def test_hard_limit_cancels_the_coroutine(make_pool: Any, outcomes: Outcomes) -> None:
    pool = make_pool()
    j = job("aio.wait_for_cancel", 30, time_limit=0.2)
    started = time.monotonic()
    outcome = run(pool, outcomes, j)
    assert (outcome.state, outcome.exc_type) == (TaskState.TIMEOUT, "TimeLimitExceeded"), outcome
    assert "hard time limit of 0.2s" in outcome.exc_message
    assert time.monotonic() - started < 2
    outcomes.wait_until(
        lambda: [j.task_id] == async_tasks.CANCELLED,
        PROMPT,
        "the coroutine to see its cancellation",
    )


def test_a_coroutine_that_swallows_cancellation_keeps_its_slot(
    make_pool: Any, outcomes: Outcomes
) -> None:
    pool = make_pool(concurrency=1)
    stubborn = job("aio.stubborn", 0.6, time_limit=0.1)
    after = job("aio.nap", 0)
    pool.apply_async(stubborn)
    assert outcomes.wait(stubborn, PROMPT).state == TaskState.TIMEOUT  # reported on time...
    started = time.monotonic()
    pool.apply_async(after)
    assert outcomes.wait(after, PROMPT).state == TaskState.SUCCESS
    # ...but the next task waited for the slot: never two coroutines at concurrency 1
    assert time.monotonic() - started > 0.2
    assert async_tasks.RUNNING["peak"] == 1


def test_terminate_job_cancels_a_running_coroutine(make_pool: Any, outcomes: Outcomes) -> None:
    pool = make_pool()
    j = job("aio.wait_for_cancel", 30)
    pool.apply_async(j)
    outcomes.wait_until(lambda: [j.task_id] == async_tasks.STARTED, PROMPT, "the job to start")
    assert pool.terminate_job(j.task_id) is True
    assert outcomes.wait(j, PROMPT).state == TaskState.REVOKED
    outcomes.wait_until(
        lambda: [j.task_id] == async_tasks.CANCELLED,
        PROMPT,
        "the coroutine to see its cancellation",
    )
    assert pool.terminate_job(j.task_id) is False


def test_retries_and_autoretry_work_for_coroutines(make_pool: Any, outcomes: Outcomes) -> None:
    pool = make_pool()
    asked = run(pool, outcomes, job("aio.retry"))
    assert (asked.state, asked.countdown) == (TaskState.RETRY, 5), asked
    auto = run(pool, outcomes, job("aio.autoretry"))
    assert (auto.state, auto.exc_type, auto.countdown) == (TaskState.RETRY, "ConnectionError", 7), (
        auto
    )
    spent = run(pool, outcomes, job("aio.retry", retries=2))
    assert (spent.state, spent.exc_type) == (TaskState.FAILURE, "MaxRetriesExceededError"), spent


def test_each_coroutine_sees_only_its_own_trace_and_log_context(
    make_pool: Any, outcomes: Outcomes
) -> None:
    from millpond.testing.otel import memory_exporter

    memory_exporter()  # a real tracer provider: apply_async opens process spans
    pool = make_pool(concurrency=50)
    jobs = [job("aio.bind_and_wait", f"m{i}", retries=i % 3) for i in range(200)]
    for j in jobs:
        pool.apply_async(j)
    for j, outcome in zip(jobs, outcomes.wait_all(jobs, PROMPT), strict=True):
        assert outcome.state == TaskState.SUCCESS, outcome
        got = outcome.result
        trace_id, process_span = parse_traceparent(j)
        assert (got["trace_id"], got["span_id"]) == (trace_id, process_span)
        assert got["log"]["task_id"] == j.task_id == got["request_id"]
        assert got["log"]["marker"] == f"m{j.args[0][1:]}"
        assert got["log"]["retries"] == j.retries
        assert (got["log"]["trace_id"], got["log"]["span_id"]) == (trace_id, process_span)


def test_plain_def_tasks_run_in_threads_with_their_own_context(
    make_pool: Any, outcomes: Outcomes
) -> None:
    pool = make_pool()
    j = job("aio.plain", 21)
    got = run(pool, outcomes, j).result
    assert got["value"] == 42
    assert got["log"]["task_id"] == j.task_id == got["request_id"]


def test_plain_def_tasks_can_be_refused(make_pool: Any, outcomes: Outcomes) -> None:
    pool = make_pool(sync_tasks="refuse")
    outcome = run(pool, outcomes, job("aio.plain", 1))
    assert (outcome.state, outcome.exc_type) == (TaskState.FAILURE, "NotSupported"), outcome
    assert "make it async def" in outcome.exc_message
    assert "MILLPOND_ASYNCIO__SYNC_TASKS=thread" in outcome.exc_message
    assert run(pool, outcomes, job("aio.add", 1, 1)).result == 2


def test_a_sync_pool_fails_an_async_task_clearly(outcomes: Outcomes) -> None:
    from millpond_pool_solo import SoloPool

    pool = SoloPool(1, outcomes, execution=kit_executor(async_tasks.app))
    pool.start()
    j = job("aio.add", 1, 2)
    pool.apply_async(j)
    outcome = outcomes.wait(j, PROMPT)
    assert (outcome.state, outcome.exc_type) == (TaskState.FAILURE, "TypeError"), outcome
    assert "aio.add is async def: run it with the asyncio pool" in outcome.exc_message
    assert "pip install millpond-pool-asyncio" in outcome.exc_message


def test_warm_stop_lets_coroutines_finish_and_cold_stop_does_not_report(
    make_pool: Any, outcomes: Outcomes
) -> None:
    pool = make_pool()
    finishing = [job("aio.nap", 0.2) for _ in range(3)]
    for j in finishing:
        pool.apply_async(j)
    pool.stop(PROMPT)
    assert all(outcomes.get(j.task_id).state == TaskState.SUCCESS for j in finishing)  # type: ignore[union-attr]

    cold = make_pool()
    abandoned = job("aio.wait_for_cancel", 30)
    cold.apply_async(abandoned)
    outcomes.wait_until(
        lambda: [abandoned.task_id] == async_tasks.STARTED, PROMPT, "the job to start"
    )
    started = time.monotonic()
    cold.terminate()
    assert time.monotonic() - started < 2
    assert outcomes.get(abandoned.task_id) is None  # its message goes back to the broker


def test_settings_section_is_declared_and_validated() -> None:
    settings = load_settings(
        env={"MILLPOND_ASYNCIO__SYNC_TASKS": "refuse", "MILLPOND_ASYNCIO__EXECUTOR_THREADS": "8"}
    )
    assert dict(settings.section(SETTINGS)) == {"sync_tasks": "refuse", "executor_threads": 8}
    with pytest.raises(ConfigurationError, match=r"asyncio\.sync_tasks.*one of 'thread', 'refuse'"):
        load_settings(env={"MILLPOND_ASYNCIO__SYNC_TASKS": "sometimes"})
    with pytest.raises(ConfigurationError, match=r"asyncio\.sync_tasks' \(options\)"):
        AsyncioPool(
            1, Outcomes(), {"sync_tasks": "sometimes"}, execution=kit_executor(async_tasks.app)
        )
    assert plugins.settings_section("asyncio") is SETTINGS  # found by the pool's name
    assert AsyncioPool.default_concurrency() == 100


def test_a_plain_def_raising_keyboard_interrupt_fails_and_the_pool_goes_on(
    make_pool: Any, outcomes: Outcomes
) -> None:
    """A BaseException out of a task body must complete its job: a plain def's used to leave
    its executor thread uncaught, so the job was never reported (its message held until the
    worker stopped)."""
    pool = make_pool(concurrency=1)
    failed = run(pool, outcomes, job("aio.sync_interrupt"))
    assert (failed.state, failed.exc_type) == (TaskState.FAILURE, "KeyboardInterrupt"), failed
    assert "itself" in failed.exc_message
    assert run(pool, outcomes, job("aio.add", 2, 3)).result == 5


def test_a_coroutine_raising_keyboard_interrupt_fails_and_the_loop_goes_on(
    make_pool: Any, outcomes: Outcomes
) -> None:
    """asyncio re-raises a coroutine's KeyboardInterrupt out of the event loop: it used to stop
    the pool's loop thread, so that job and every later one were never reported."""
    pool = make_pool(concurrency=1)
    failed = run(pool, outcomes, job("aio.interrupt"))
    assert (failed.state, failed.exc_type) == (TaskState.FAILURE, "KeyboardInterrupt"), failed
    assert "itself" in failed.exc_message
    assert run(pool, outcomes, job("aio.add", 2, 3)).result == 5
