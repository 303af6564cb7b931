"""What the consumers of the transports that can only be polled (kombu's virtual transports, the
file-system broker's directory) share: taking from their queues in turn, counting deliveries, and
the fetch loop (look; between looks wait on the worker's waker, so a completion interrupts it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from millpond.contracts.broker import Delivery
from millpond.contracts.waking import Waker
from millpond.wire.protocol import DELIVERY_COUNT, Message


def delivered(message: Message, queue: str, tag: Any) -> Delivery:
    """`message` from `queue` as delivery `tag`, counted by its delivery-count header (missing or
    not a positive int: the first delivery)."""
    count = message.headers.get(DELIVERY_COUNT, 1)
    count = count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 1
    return Delivery(message=message, queue=queue, tag=tag, redelivered=count > 1,
                    delivery_count=count)  # fmt: skip


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
