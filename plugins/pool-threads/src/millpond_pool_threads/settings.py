"""The `[threads]` settings section (`MILLPOND_THREADS__*` in the environment)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from millpond.config.options import Section, declared, setting


@dataclass(frozen=True, slots=True)
class ThreadsConfig:
    """The [threads] section: each field declares one setting (`SECTION` is derived from them);
    the validated values, frozen for the pool's hot path."""

    stack_size: int | None = setting(
        None,
        "Stack size of each pool thread, in KiB (at least 32); unset keeps the interpreter's "
        "default. Lower it to run hundreds of threads in less memory, raise it for deeply "
        "recursive tasks.",
        minimum=32,
    )


SECTION = Section("threads", "Threads pool", declared(ThreadsConfig))


def resolve(options: Mapping[str, Any]) -> ThreadsConfig:
    """Every option's value: the worker passes validated values, a test may pass plain ones."""
    return ThreadsConfig(**SECTION.resolve(options))
