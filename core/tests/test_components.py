"""Worker components (`millpond.components`): the worker builds every installed one, starts them
before the first fetch, asks the filtering ones whether a task must be discarded, stops them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from millpond import Millpond
from millpond.consume.worker import Worker
from millpond.contracts.component import WorkerComponent


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
