"""The `rate_limit` control command: Celery's `celery control rate_limit <task> <rate>`.

Arguments and replies are Celery's: `task_name` and `rate_limit` ("10/m", "5/s", a number per
second; empty or "0" switches the limit off), answered `{"ok": "new rate limit set successfully"}`,
`{"ok": "rate limit disabled successfully"}`, or `{"error": ...}` for a rate Celery would refuse
(`Invalid rate limit string: ...`) or a task this worker does not have (`unknown task`). The change
applies to the workers the command reaches, until they restart (as in Celery); the task's
`rate_limit` option is what a restarted worker starts with. The limits are kept by the worker's
`ratelimit` component (millpond-ratelimit); this command only reaches it by that name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import structlog

from millpond.exceptions import ConfigurationError, UnknownTask
from millpond.produce.task import InvalidRateLimit, parse_rate
from millpond_control.registry import ControlContext, Reply, command, nok, ok

log = structlog.get_logger("millpond.worker")


@runtime_checkable
class RateLimiting(Protocol):
    """What this command needs of the worker's `ratelimit` component."""

    def set_rate_limit(self, task_name: str, rate: str | float | None) -> None: ...


@command(kind="control", args=(("task_name", str), ("rate_limit", str)))
def rate_limit(ctx: ControlContext, task_name: str, rate_limit: Any = None, **_: Any) -> Reply:
    """Set a task's rate limit on this worker (empty or 0: no limit)."""
    try:
        parse_rate(rate_limit)
    except InvalidRateLimit as exc:
        return nok(f"Invalid rate limit string: {exc!r}")
    limits = ctx.worker.components.get("ratelimit")
    if not isinstance(limits, RateLimiting):
        return nok("this worker keeps no rate limits (millpond-ratelimit is not installed)")
    try:
        limits.set_rate_limit(task_name, rate_limit)
    except UnknownTask:
        log.error("rate limit attempt for unknown task", task_name=task_name)
        return nok("unknown task")
    except ConfigurationError as exc:  # a global limit with no store to share it in
        return nok(str(exc))
    off = parse_rate(rate_limit) is None
    task = ctx.worker.app.tasks[task_name]  # what `registered` shows, as Celery's task.rate_limit
    task.options = dataclasses.replace(task.options, rate_limit=None if off else rate_limit)
    if off:
        return ok("rate limit disabled successfully")
    return ok("new rate limit set successfully")
