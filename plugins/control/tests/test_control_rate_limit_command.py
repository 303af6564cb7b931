"""The `rate_limit` control command: Celery's arguments and replies, on a running worker."""

from __future__ import annotations

import time
from typing import Any

import pytest

from millpond import Millpond
from millpond.testing.harness import wait_until
from millpond_control.registry import COMMANDS, ControlContext, Request


def limited_app(app: Millpond) -> None:
    @app.task(name="rl.limited", rate_limit="20/s")
    def limited(n: int) -> float:
        return time.time()

    @app.task(name="rl.free")
    def free(n: int) -> float:
        return time.time()


def test_the_rate_limit_control_command_answers_as_celery_does(
    memory_app: Millpond, start_worker: Any
) -> None:
    limited_app(memory_app)
    worker = start_worker(memory_app, pool="threads").worker
    limits: Any = worker.components["ratelimit"]  # millpond-ratelimit keeps the limits
    cmd = COMMANDS.get("rate_limit")
    assert cmd is not None and cmd.kind == "control" and not cmd.safe
    assert [name for name, _ in cmd.args] == ["task_name", "rate_limit"]

    def call(**arguments: Any) -> Any:
        ctx = ControlContext(worker, worker.name, Request("rate_limit", arguments))
        return cmd.handler(ctx, **arguments)

    assert call(task_name="rl.free", rate_limit="5/m") == {"ok": "new rate limit set successfully"}
    assert limits.rate_limit_of("rl.free") == pytest.approx(5 / 60)
    assert call(task_name="rl.free", rate_limit="") == {"ok": "rate limit disabled successfully"}
    assert limits.rate_limit_of("rl.free") is None
    assert call(task_name="rl.nope", rate_limit="1/s") == {"error": "unknown task"}
    reply = call(task_name="rl.free", rate_limit="5/week")
    assert reply["error"].startswith("Invalid rate limit string: InvalidRateLimit(")


def test_reserved_lists_the_jobs_a_rate_limit_holds_back(
    memory_app: Millpond, start_worker: Any
) -> None:
    """Held jobs wait beside the buffer, in a holder: `inspect reserved` lists them too."""

    @memory_app.task(name="rl.slow", rate_limit="4/m")
    def slow(n: int) -> int:
        return n

    first, *waiting = [slow.delay(n) for n in range(3)]
    worker = start_worker(memory_app, pool="threads").worker
    assert first.get(timeout=10) == 0  # the bucket's one token; the next in 15 s, 30 s
    cmd = COMMANDS.get("reserved")
    assert cmd is not None

    def listed() -> set[str]:
        ctx = ControlContext(worker, worker.name, Request("reserved", {}))
        return {job["id"] for job in cmd.handler(ctx)}

    wait_until(lambda: listed() == {r.id for r in waiting}, 10, "the held jobs to be listed")
    held = [job for holder in worker.holders for job in holder.held()]
    assert {job.task_id for job in held} == {r.id for r in waiting}
