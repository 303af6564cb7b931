"""The `[asyncio]` settings section (`MILLPOND_ASYNCIO__*`), published through `millpond.settings`.

It lives in its own module so `millpond config` and the docs generator can read it without
importing the pool itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from millpond.config.options import Section, declared, setting


@dataclass(frozen=True)
class AsyncioSettings:
    """The [asyncio] section: each field declares one setting (`SETTINGS` is derived from them)."""

    sync_tasks: str = setting(
        "thread",
        "How plain `def` tasks run on the asyncio pool: thread (in the loop's default executor,"
        " so they never block the event loop) or refuse (they fail with an error that says to "
        "make them async def).",
        choices=("thread", "refuse"),
    )
    executor_threads: int | None = setting(
        None,
        "Threads for plain `def` tasks; unset means the pool's concurrency (threads are started"
        " only when needed).",
        minimum=1,
    )


SETTINGS = Section("asyncio", "asyncio pool", declared(AsyncioSettings))
