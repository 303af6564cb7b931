"""The `[asyncio]` settings section (`MILLPOND_ASYNCIO__*`), published through `millpond.settings`.

It lives in its own module so `millpond config` and the docs generator can read it without
importing the pool itself.
"""

from __future__ import annotations

from millpond.config.options import Option, Section

SETTINGS = Section(
    "asyncio",
    "asyncio pool",
    (
        Option(
            "sync_tasks",
            "str",
            "thread",
            "How plain `def` tasks run on the asyncio pool: thread (in the loop's default "
            "executor, so they never block the event loop) or refuse (they fail with an error "
            "that says to make them async def).",
            choices=("thread", "refuse"),
        ),
        Option(
            "executor_threads",
            "int",
            None,
            "Threads for plain `def` tasks; unset means the pool's concurrency (threads are "
            "started only when needed).",
            minimum=1,
            nullable=True,
        ),
    ),
)
