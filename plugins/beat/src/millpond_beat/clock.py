"""The scheduler's clock, injectable: tests run years of ticks in milliseconds with `FakeClock`.

The scheduler asks the clock two things only: what time it is (epoch seconds, the same on every
replica, so ticks are comparable between them) and to wait until a stop is asked for or some
seconds have passed. A fake clock moves its time forward instead of waiting.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch (UTC)."""
        ...

    def wait(self, seconds: float, stop: threading.Event) -> bool:
        """Wait up to `seconds` or until `stop` is set; return whether it is set."""
        ...


class SystemClock:
    """The wall clock (replicas on different machines need NTP, as for any lease)."""

    def time(self) -> float:
        return time.time()

    def wait(self, seconds: float, stop: threading.Event) -> bool:
        return stop.wait(max(0.0, seconds))


class FakeClock:
    """Time that moves only when the scheduler waits (or `advance` is called)."""

    def __init__(self, start: float) -> None:
        self.now = float(start)

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += max(0.0, seconds)

    def wait(self, seconds: float, stop: threading.Event) -> bool:
        if stop.is_set():
            return True
        self.advance(seconds)
        return stop.is_set()
