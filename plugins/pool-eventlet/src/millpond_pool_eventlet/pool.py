"""The eventlet pool: millpond's green pool (`millpond_green.base.GreenPool`) on eventlet.

eventlet is deprecated upstream (bugfix-only maintenance, and its authors advise against it for new
projects). This pool exists for applications already built on eventlet; it works and is tested the
same way as the gevent pool, logs a one-line notice when it starts, and the docs recommend gevent.

The pool itself (job bookkeeping, the waiting FIFO, time limits, terminate_job, warm and cold
stops, resize) is the core's green base, shared with the gevent pool; this module gives it
eventlet's primitives. Jobs run in raw greenthreads (`eventlet.spawn_n`), counted by the base
instead of an `eventlet.GreenPool`, whose `spawn` blocks its caller (the consumer loop) when full.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from millpond_green.base import GreenEvent, GreenPool, Unit
from millpond_pool_eventlet import greenselect, patch

patch.import_eventlet()  # the first import of eventlet, without its multi-line warning
import eventlet  # noqa: E402
from eventlet import greenthread  # noqa: E402
from eventlet.green import threading as green_threading  # noqa: E402

__all__ = ["EventletPool"]

DEPRECATION_NOTICE = (
    "the eventlet pool is legacy: eventlet is deprecated upstream (bugfix-only); it works here, "
    "but new deployments should use --pool gevent"
)


class EventletPool(GreenPool):
    """Runs each job in its own greenthread; needs `millpond_pool_eventlet.patch.patch()` first."""

    name = "eventlet"
    patch_call = "millpond_pool_eventlet.patch.patch()"
    timeout_error = eventlet.Timeout

    @classmethod
    def unpatched(cls) -> list[str]:
        return patch.missing()

    def on_start(self) -> None:
        self._log.warning(DEPRECATION_NOTICE)
        greenselect.install()  # in case the process was patched without `patch()`
        super().on_start()

    def spawn(self, run: Callable[[Unit], None], unit: Unit) -> Any:
        return eventlet.spawn_n(run, unit)

    def kill(self, greenlet: Any, exception: BaseException) -> None:
        # eventlet switches into the greenthread at once: it ends before kill returns, unless it
        # computes without yielding (then nothing can reach it).
        greenthread.kill(greenlet, exception)

    def start_timeout(self, seconds: float, exception: BaseException | None = None) -> Any:
        return eventlet.Timeout(seconds, exception)  # started when made

    def cancel_timeout(self, timer: Any) -> None:
        timer.cancel()

    def new_event(self) -> GreenEvent:
        event: GreenEvent = green_threading.Event()
        return event
