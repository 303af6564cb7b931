"""The `[prefork]` settings section (`MILLPOND_PREFORK__*` in the environment)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from millpond.settings import Option, Section

SECTION = Section(
    "prefork",
    "Prefork pool",
    (
        Option(
            "max_tasks_per_child",
            "int",
            None,
            "Replace a child process after it ran this "
            "many tasks (it finishes and reports its task first); unset never recycles. Use "
            "it for tasks that leak memory or file handles.",
            minimum=1,
            nullable=True,
        ),
        Option(
            "max_memory_per_child",
            "int",
            None,
            "Replace a child process once its resident "
            "memory reaches this many MiB, checked after each task; unset never checks.",
            minimum=1,
            nullable=True,
        ),
        Option(
            "kill_grace",
            "float",
            1.0,
            "Seconds a child stopped by a hard time limit or "
            "terminate_job gets to unwind (its task sees the exception, its spans are "
            "flushed) before SIGKILL.",
            minimum=0,
        ),
        Option(
            "start_timeout",
            "float",
            30.0,
            "Seconds the pool waits for its children to be "
            "ready at start-up before it gives up with an error.",
            minimum=1,
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class PreforkConfig:
    """The validated `[prefork]` options: read by the parent and inherited by every child."""

    max_tasks_per_child: int | None = None
    max_memory_per_child: int | None = None
    kill_grace: float = 1.0
    start_timeout: float = 30.0


def resolve(options: Mapping[str, Any]) -> PreforkConfig:
    """Check `options` against the section: the worker passes validated values, a test may not."""
    return PreforkConfig(**SECTION.validate(options, "prefork pool option"))
