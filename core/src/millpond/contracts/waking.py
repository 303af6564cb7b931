"""Waking the consumer loop: a self-pipe `Waker` and the `Inbox` completions arrive through.

The loop blocks in the broker's fetch; a completion from any thread, greenlet or signal handler
must interrupt that wait at once, or acks (and with them the prefetch window) wait for the next
poll timeout. A consumer `select()`s on the waker's socket next to its own.
"""

from __future__ import annotations

import select
import socket
from collections import deque
from contextlib import suppress
from typing import Generic, TypeVar

T = TypeVar("T")


class Waker:
    """`wake()` may be called from any thread (and from a signal handler); it is idempotent until
    `clear()`. The socket pair works with gevent's and eventlet's patched `select` too."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        #: woken since the last `clear()` (consumers read it; only `wake` and `clear` set it)
        self.is_set = False

    def fileno(self) -> int:
        return self._r.fileno()

    def wake(self) -> None:
        if not self.is_set:
            self.is_set = True
            with suppress(OSError):  # already full of wake-ups (BlockingIOError), or closed
                self._w.send(b"\0")

    def clear(self) -> None:
        if self.is_set:  # else nothing was written since the last clear: no recv() syscall
            self.is_set = False
            with suppress(OSError):  # BlockingIOError: drained
                while self._r.recv(4096):
                    pass

    def wait(self, timeout: float | None) -> bool:
        """Block until woken or `timeout` seconds pass; returns whether it was woken."""
        if self.is_set:
            return True
        try:
            ready, _, _ = select.select([self._r], [], [], timeout)
        except (OSError, ValueError):
            return True
        return bool(ready)

    def close(self) -> None:
        for sock in (self._r, self._w):
            with suppress(OSError):
                sock.close()


class Inbox(Generic[T]):
    """A thread-safe queue whose arrivals wake the consumer loop at once (see `Waker`)."""

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self.waker = Waker()

    def put(self, item: T, *, wake: bool = True) -> None:
        """`wake=False` from the loop's own thread, which drains before it next waits."""
        self._items.append(item)
        if wake:
            self.waker.wake()

    def drain(self) -> list[T]:
        """What was put so far; the loop clears the waker before (a put after that wakes it)."""
        items = self._items
        return [items.popleft() for _ in range(len(items))]
