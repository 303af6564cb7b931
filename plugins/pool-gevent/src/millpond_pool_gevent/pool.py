"""The gevent pool: millpond's green pool (`millpond_green.base.GreenPool`) on gevent.

The pool itself (job bookkeeping, the waiting FIFO, time limits, terminate_job, warm and cold
stops, resize) is the core's green base; this module gives it gevent's primitives. Jobs run in raw
greenlets (`gevent.spawn_raw`), which `gevent.kill`, `gevent.killall` and `gevent.Timeout` handle
like any other: a `gevent.Greenlet` (links, an event) would cost about 10 us a job, a quarter of
the whole per-job cost of the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent
import gevent.event

from millpond_green.base import GreenEvent, GreenPool, Unit
from millpond_pool_gevent import patch

__all__ = ["GeventPool"]


class GeventPool(GreenPool):
    """Runs each job in its own greenlet; needs `millpond_pool_gevent.patch.patch()` first."""

    name = "gevent"
    patch_call = "millpond_pool_gevent.patch.patch()"
    timeout_error = gevent.Timeout

    @classmethod
    def unpatched(cls) -> list[str]:
        return patch.missing()

    def spawn(self, run: Callable[[Unit], None], unit: Unit) -> Any:
        return gevent.spawn_raw(run, unit)

    def kill(self, greenlet: Any, exception: BaseException) -> None:
        gevent.kill(greenlet, exception)

    def kill_all(self, greenlets: list[Any], exception: BaseException) -> None:
        # Greenlets blocked in I/O die at once; one computing without yielding cannot be reached,
        # so do not wait for it for long.
        gevent.killall(greenlets, exception, block=True, timeout=1.0)

    def start_timeout(self, seconds: float, exception: BaseException | None = None) -> Any:
        timer = gevent.Timeout(seconds, exception)
        timer.start()
        return timer

    def cancel_timeout(self, timer: Any) -> None:
        timer.close()

    def new_event(self) -> GreenEvent:
        event: GreenEvent = gevent.event.Event()
        return event
