"""The fetch loop of the transports that can only be polled (kombu's virtual transports, the
directory of the file-system broker): look, and between looks wait on the worker's waker so a
completion still interrupts the wait at once."""

from __future__ import annotations

import time
from collections.abc import Callable

from millpond.contracts.broker import Delivery
from millpond.contracts.waking import Waker


def poll_fetch(
    look: Callable[[], list[Delivery]],
    timeout: float,
    interval: float,
    waker: Waker | None,
    closed: Callable[[], bool],
) -> list[Delivery]:
    """What `look()` finds, looking every `interval` seconds until `timeout`; returns early with
    nothing when the waker fires (after one more look) or the consumer is closed."""
    deadline = time.monotonic() + timeout
    while True:
        got = look()
        if got:
            return got
        left = deadline - time.monotonic()
        if left <= 0 or closed():
            return []
        pause = min(interval, left)
        if waker is None:
            time.sleep(pause)
            continue
        if waker.is_set:
            return []
        if waker.wait(pause):
            return look()
