"""The `[prefork]` settings section (`MILLPOND_PREFORK__*` in the environment)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from millpond.config.options import Section, declared, setting


@dataclass(frozen=True, slots=True)
class PreforkConfig:
    """The [prefork] section: each field declares one setting (`SECTION` is derived from them);
    the validated values, read by the parent and inherited by every child."""

    max_tasks_per_child: int | None = setting(
        None,
        "Replace a child process after it ran this many tasks (it finishes and reports its task"
        " first); unset never recycles. Use it for tasks that leak memory or file handles.",
        minimum=1,
    )
    max_memory_per_child: int | None = setting(
        None,
        "Replace a child process once its resident memory reaches this many MiB, checked after "
        "each task; unset never checks.",
        minimum=1,
    )
    prefetch_per_child: int = setting(
        4,
        "Jobs a child process holds at once: the one it runs and the ones queued behind it. "
        "Above 1 a child starts its next job without waiting for a round trip to the worker "
        "(jobs go to the least busy child, so a job waits behind a running one only when every "
        "child is busy); 1 sends a job only to an idle child, for long tasks where a queued job"
        " must never wait behind another.",
        minimum=1,
    )
    reserve_per_child: int = setting(
        4,
        "Jobs per child the pool holds in the worker process beyond what the children hold, "
        "handed to the first child with room the moment one of its jobs ends, without waiting "
        "for the worker's loop (which is busy with the broker meanwhile); 0 lets the loop "
        "refill the children itself.",
        minimum=0,
    )
    kill_grace: float = setting(
        1.0,
        "Seconds a child stopped by a hard time limit or terminate_job gets to unwind (its task"
        " sees the exception, its spans are flushed) before SIGKILL.",
        minimum=0,
    )
    start_timeout: float = setting(
        30.0,
        "Seconds the pool waits for its children to be ready at start-up before it gives up "
        "with an error.",
        minimum=1,
    )


SECTION = Section("prefork", "Prefork pool", declared(PreforkConfig))


def resolve(options: Mapping[str, Any]) -> PreforkConfig:
    """Every option's value: the worker passes validated values, a test may pass plain ones."""
    return PreforkConfig(**SECTION.resolve(options))
