"""The fetch loop of the transports that can only be polled (kombu's virtual transports, the
directory of the file-system broker): look, and between looks wait on the worker's waker so a
completion still interrupts the wait at once."""

from __future__ import annotations

import time
from collections.abc import Callable

from millpond.contracts.broker import Delivery
from millpond.contracts.waking import Waker


def take_in_turn(
    queues: list[str], turn: int, want: int, take: Callable[[str], Delivery | None]
) -> tuple[list[Delivery], int]:
    """Up to `want` deliveries, `take`n from `queues` in turn starting at `turn`, until every queue
    in a row gave none; and the turn to start at next time (so no queue starves the others)."""
    out: list[Delivery] = []
    empty = 0
    while len(out) < want and empty < len(queues):
        got = take(queues[turn % len(queues)])
        turn += 1
        if got is None:
            empty += 1
        else:
            empty = 0
            out.append(got)
    return out, turn


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
