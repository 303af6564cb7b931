"""The Redis side channel: where benchmark tasks report marks, whatever broker is under test.

Every key of one harness invocation starts with `millpond-bench:<run id>:`, so clean-up is a prefix
scan and two harnesses on one Redis never read each other's marks.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from benchmarks.model import RunFailed

DEFAULT_URL = "redis://127.0.0.1:6379/0"


class SideChannel:
    """Keys, waits and clean-up for task-reported marks."""

    def __init__(self, url: str = DEFAULT_URL) -> None:
        self.url = url
        self.prefix = f"millpond-bench:{uuid.uuid4().hex[:10]}:"
        self.client = redis.Redis.from_url(url)

    def check(self) -> str | None:
        """None when Redis answers, else what to do: every scenario needs it."""
        try:
            self.client.ping()
        except redis.RedisError as exc:
            return (
                f"the side-channel Redis at {self.url} is not reachable ({exc}); the benchmark "
                "tasks report through it whatever the broker under test is: start Redis or pass "
                "--side-url"
            )
        return None

    def key(self, what: str) -> str:
        return f"{self.prefix}{what}:{uuid.uuid4().hex[:8]}"

    def wait(
        self,
        key: str,
        deadline: float,
        alive: Callable[[], str | None],
        what: str,
    ) -> float:
        """Pop the next value pushed to `key`, as a float, before `deadline` (monotonic).

        `alive()` returns None while the worker runs, else why it stopped: a dead worker fails the
        run at once instead of at the deadline.
        """
        return float(self.wait_raw(key, deadline, alive, what))

    def wait_json(
        self, key: str, deadline: float, alive: Callable[[], str | None], what: str
    ) -> Any:
        """Like `wait`, for a value a task pushed as JSON (a mark with its CPU figures)."""
        return json.loads(self.wait_raw(key, deadline, alive, what))

    def wait_raw(
        self, key: str, deadline: float, alive: Callable[[], str | None], what: str
    ) -> bytes:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunFailed(f"timed out waiting for {what}")
            item = self.client.blpop([key], timeout=min(0.5, max(remaining, 0.01)))
            if item is not None:
                value = item[1]
                return value.encode() if isinstance(value, str) else value
            problem = alive()
            if problem is not None:
                raise RunFailed(f"{problem} while waiting for {what}")

    def clear(self) -> None:
        """Delete every key of this harness invocation."""
        keys = list(self.client.scan_iter(match=f"{self.prefix}*", count=1000))
        if keys:
            self.client.delete(*keys)

    def close(self) -> None:
        try:
            self.clear()
        finally:
            self.client.close()
