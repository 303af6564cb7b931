"""Log lines that can repeat per message (tasks expired unrun, children recycled for memory): an
operator must hear of them, but a flood of messages must not become a flood of lines. The first of
a kind is logged at once; later ones within `interval` seconds are counted into the next line of
that kind (`and_before`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Throttled:
    """`log(kind, event, **fields)` logs through `emit` at most once per `interval` per kind."""

    emit: Callable[..., Any]
    interval: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    #: kind -> (when it was last logged, how many were held back since)
    _kinds: dict[str, tuple[float, int]] = field(default_factory=dict, init=False)

    def log(self, kind: str, event: str, **fields: Any) -> None:
        """Log it now, or count it for the next line of its kind."""
        now = self.clock()
        with self._lock:
            last, held = self._kinds.get(kind, (float("-inf"), 0))
            if now - last < self.interval:
                self._kinds[kind] = (last, held + 1)
                return
            self._kinds[kind] = (now, 0)
        if held:
            fields["and_before"] = held
        self.emit(event, **fields)
