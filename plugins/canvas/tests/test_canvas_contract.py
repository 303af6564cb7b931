"""The contract the core reaches the canvas through (millpond.contracts.canvas): the entry point,
what an app builds from it, and what the core's stand-in says when no canvas is installed."""

from __future__ import annotations

import pytest

from millpond import Millpond, Signature, chain
from millpond.config import plugins
from millpond.contracts.canvas import Canvas
from millpond.contracts.pool import Job, Outcome
from millpond.exceptions import PluginNotFound
from millpond.produce.task import Request
from millpond.states import TaskState
from millpond_canvas.plugin import CeleryCanvas

BUILTINS = {"celery.map", "celery.starmap", "celery.chunks", "celery.accumulate",
            "celery.chord_unlock"}  # fmt: skip


def test_the_entry_point_names_the_canvas_and_its_package() -> None:
    assert plugins.canvas_class() is CeleryCanvas
    eps = [ep for ep in plugins.entry_points(plugins.CANVAS) if ep.name == "canvas"]
    listed = [plugins.describe(ep) for ep in eps]
    assert [(i.distribution, i.core_range) for i in listed] == [("millpond-canvas", ">=0.1,<0.2")]


def test_an_app_builds_its_canvas_once_on_first_use_with_celerys_builtin_tasks(
    memory_app: Millpond,
) -> None:
    assert not BUILTINS & set(memory_app.tasks)  # nothing loaded by making an app

    @memory_app.task(name="c.add")
    def add(x: int, y: int) -> int:
        return x + y

    sig = add.s(2)
    assert isinstance(sig, Signature)
    assert isinstance(memory_app.canvas, CeleryCanvas)
    assert memory_app.canvas is memory_app.canvas
    assert set(memory_app.tasks) >= BUILTINS
    assert isinstance(sig | add.s(3), chain)
    assert memory_app.signature("c.add", (1, 2)) == add.s(1, 2)


def test_without_a_canvas_plugin_every_canvas_call_names_the_package(
    memory_app: Millpond,
) -> None:
    stand_in = Canvas(memory_app)
    job = Job(task_id="t1", task_name="c.add", args=(), kwargs={})
    outcome = Outcome(state=TaskState.FAILURE, exc_type="ValueError", exc_message="no")
    calls = [
        lambda: stand_in.signature("c.add"),
        lambda: stand_in.from_dict({"task": "c.add"}),
        lambda: stand_in.after_success(job, 1),
        lambda: stand_in.after_failure(job, outcome, {}),
        lambda: stand_in.chord_part(job, TaskState.SUCCESS, 1),
    ]
    for call in calls:
        with pytest.raises(PluginNotFound, match="pip install millpond-canvas"):
            call()
    # in the execution unit it never raises: after_failure reports what it cannot run
    failed = Job(task_id="t1", task_name="c.add", args=(), kwargs={}, embed={"errbacks": [{}]})
    assert stand_in.inline_errbacks(Request(failed), outcome) is None
