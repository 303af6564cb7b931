"""Worker components (`millpond.components`): the worker builds every installed one, starts them
before the first fetch, asks the filtering ones whether a task must be discarded, stops them."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import pytest

from millpond import Millpond
from millpond.consume.worker import Worker
from millpond.contracts.component import WorkerComponent
from millpond.contracts.pool import Job
from millpond_cli.main import banner


@pytest.fixture(autouse=True)
def own_home(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control plane's revoked file in a directory of this test's own."""
    monkeypatch.setenv("MILLPOND_HOME", str(tmp_path))


class Deny(WorkerComponent):
    """Discards the tasks whose id it holds, and records what the worker asked of it."""

    filters_tasks = True

    def __init__(self, worker: Worker, denied: str, calls: list[str]) -> None:
        super().__init__(worker)
        self.denied, self.calls = denied, calls

    def start(self) -> None:
        self.calls.append(f"start {self.denied}")

    def stop(self) -> None:
        self.calls.append(f"stop {self.denied}")

    def discard(self, task_id: str, headers: Mapping[str, Any]) -> str | None:
        return f"denied by {self.denied}" if task_id == self.denied else None


def test_the_installed_control_plane_is_a_component_and_filters_revokes(
    memory_app: Millpond,
) -> None:
    worker = Worker(memory_app, pool="threads", concurrency=1)
    assert "control" in worker.components
    plane: Any = worker.components["control"]
    plane.revoked.add(["gone"])
    assert worker.discard("gone", {}) is not None
    assert worker.discard("kept", {}) is None


def test_several_filters_are_asked_in_order_and_the_first_reason_wins(
    memory_app: Millpond,
) -> None:
    calls: list[str] = []
    worker = Worker(memory_app, pool="threads", concurrency=1)
    worker.components = {
        "a": Deny(worker, "one", calls),
        "b": Deny(worker, "two", calls),
        "quiet": WorkerComponent(worker),  # filters nothing: never asked
    }
    discard = worker._discarder()
    assert discard("one", {}) == "denied by one"
    assert discard("two", {}) == "denied by two"
    assert discard("three", {}) is None
    worker.components = {}
    assert worker._discarder()("one", {}) is None  # no component: nothing is discarded


def test_a_component_is_started_before_the_first_fetch_and_stopped_at_shutdown(
    memory_app: Millpond,
) -> None:
    from millpond.exceptions import TaskRevokedError
    from millpond.testing.fixtures import RunningWorker

    @memory_app.task(name="comp.echo")
    def echo(x: int) -> int:
        return x

    calls: list[str] = []
    denied = echo.apply_async((1,))  # sent before the worker starts: its first fetch has it
    running = RunningWorker(memory_app, pool="threads")
    worker = running.worker
    worker.components["deny"] = Deny(worker, denied.id, calls)
    worker.discard = worker._discarder()  # the control plane's and this one's, in name order
    running.start()
    assert calls == [f"start {denied.id}"]
    with pytest.raises(TaskRevokedError, match=f"denied by {denied.id}"):
        denied.get(timeout=30)
    assert echo.delay(3).get(timeout=30) == 3
    assert running.stop() == 0
    assert calls == [f"start {denied.id}", f"stop {denied.id}"]


class HoldBack(WorkerComponent):
    """Holds every job of one task until `open()` (from any thread), like a rate limit whose
    token comes late: the worker must run the other tasks meanwhile, then the held ones."""

    holds_tasks = True

    def __init__(self, worker: Worker, task_name: str) -> None:
        super().__init__(worker)
        self.task_name = task_name
        self.jobs: list[Job] = []
        self.opened = threading.Event()
        self.drained = 0

    def open(self) -> None:
        self.opened.set()
        self.worker.inbox.waker.wake()

    def may_hold(self, task_name: str) -> bool:
        return task_name == self.task_name

    def hold(self, job: Job) -> bool:
        if job.task_name != self.task_name:
            return False
        self.jobs.append(job)
        return True

    def release(self) -> Job | None:
        if not (self.jobs and self.opened.is_set()):
            return None
        job = self.jobs.pop(0)
        if job.delivery is not None:  # acks_late off: the early ack may_hold deferred is made now
            self.worker.acks.ack_now([job.delivery])
            job.delivery = None
        return job

    def next_release(self) -> float | None:
        return 0.0 if self.jobs and self.opened.is_set() else None

    def held(self) -> list[Job]:
        return list(self.jobs)

    def drain(self) -> list[Job]:
        jobs, self.jobs = self.jobs, []
        self.drained += len(jobs)
        return jobs

    def window_room(self, *, opening: bool = False) -> int:
        return 4 if opening else len(self.jobs)

    def beside_window(self) -> int:
        return len(self.jobs)

    def describe_task(self, task_name: str) -> str:
        return "  [held back]" if task_name == self.task_name else ""


def test_a_component_holds_jobs_back_beside_the_window_and_releases_them(
    memory_app: Millpond,
) -> None:
    """The contract the rate limits use, without rate limits: held jobs wait outside the
    prefetch window (a prefetch of 1 still runs every other task), unacknowledged, early acks
    deferred; once released they start first (control's tests: listed as reserved)."""
    from millpond.testing.fixtures import RunningWorker

    @memory_app.task(name="comp.held", acks_late=False)
    def held(x: int) -> int:
        return x

    @memory_app.task(name="comp.free")
    def free(x: int) -> int:
        return x

    waiting = [held.delay(n) for n in range(3)]
    others = [free.delay(n) for n in range(6)]  # queued behind the held ones
    running = RunningWorker(memory_app, pool="threads", concurrency=1, prefetch_multiplier=1)
    worker = running.worker
    holder = HoldBack(worker, "comp.held")
    worker.components["hold"] = holder
    worker.holders = [holder]
    assert "[held back]" in banner(worker)
    running.start()
    try:
        assert [r.get(timeout=30) for r in others] == list(range(6))
        assert len(holder.jobs) == 3  # none ran, all three beside a window of one
        assert all(job.delivery is not None for job in holder.jobs)  # not acked on receipt
        holder.open()
        assert [r.get(timeout=30) for r in waiting] == [0, 1, 2]
    finally:
        assert running.stop() == 0
    assert worker.acks is not None and worker.acks.held == 0  # every one was acknowledged


def test_a_consumer_that_cannot_resize_keeps_its_window_and_warns_when_it_is_too_narrow(
    memory_app: Millpond, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quorum queue's consumer cannot change its prefetch: the window opened with the holders'
    room stays, asked once; when it is already narrower than they want, the operator is told."""
    import structlog

    from millpond_broker_embedded.memory import MemoryConsumer

    asked: list[int] = []

    def refuse(self: MemoryConsumer, prefetch: int) -> bool:
        asked.append(prefetch)
        return False

    monkeypatch.setattr(MemoryConsumer, "resize", refuse)
    worker = Worker(memory_app, pool="threads", concurrency=1, prefetch_multiplier=1)
    holder = HoldBack(worker, "comp.held")
    worker.components, worker.holders = {"hold": holder}, [holder]
    memory_app.broker.connect()
    worker.open_consumer(worker.queues)  # opens with 1 + the holder's 4
    worker.concurrency = 8  # a pool resize: the window wants 8 now, the consumer keeps 5
    worker.closing = True  # the window is looked after, then nothing is fetched
    with structlog.testing.capture_logs() as logged:
        assert not worker._fetch()
        assert not worker._fetch()
    assert asked == [8]  # asked once: a consumer that refused is not asked again
    assert [line["event"] for line in logged if line["log_level"] == "warning"] == [
        "this broker's consumer cannot widen its prefetch window at run time: messages held "
        "back (rate-limited ones waiting for a token) take room from other tasks until the "
        "worker restarts"
    ]
    assert worker.consumer is not None
    worker.consumer.close()
