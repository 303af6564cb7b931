"""Rate limits as a worker component (`millpond.components` entry point `ratelimit`).

The worker knows only the component contract's "hold this task back" methods; this component
answers them with a `Gate` (one lane per limited task, see `gate.py`). It reads each task's
`rate_limit` when the worker is built (a global limit with no shared store stops the start there),
takes a limited task's messages into its lane, gives one back to the loop when its token is there,
hands messages that would wait too long back to the broker as delayed ones, and widens the broker's
prefetch window by what the lanes hold, so unlimited tasks keep flowing beside a limited flood.

`set_rate_limit` is Celery's `rate_limit` control command (millpond-control calls it): it may be
called from any thread and takes effect on the consumer loop's next turn.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING

import structlog

from millpond.config import plugins
from millpond.contracts.component import WorkerComponent
from millpond.contracts.pool import Job
from millpond.exceptions import ConfigurationError, MillpondError, UnknownTask
from millpond.produce.task import parse_rate
from millpond_ratelimit.gate import Gate
from millpond_ratelimit.limiter import SharedLimiter, describe_rate, limiter_for_url

if TYPE_CHECKING:
    from millpond.consume.worker import Worker

log = structlog.get_logger("millpond.worker")

#: seconds between looks for messages that waited `rate_limit_max_hold` in a lane
_TEND_EVERY = 1.0


class RateLimits(WorkerComponent):
    """The worker's rate-limited tasks: their limits, and their messages waiting for a token."""

    holds_tasks = True

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker)
        self.settings = settings = worker.settings
        #: task name -> (tokens per second or None, shared by the fleet)
        self._limits: dict[str, tuple[float | None, bool]] = self._initial_limits()
        self._lock = threading.Lock()
        #: jobs whose lane went away (their limit was lifted): they start first, like any job
        self._freed: deque[Job] = deque()
        self._stale_check = 0.0
        self.gate = Gate(
            parking=settings.rate_limit_parking or worker.prefetch,
            max_hold=settings.rate_limit_max_hold,
            hand_back=self._hand_back,
            shared=self._shared_limiter,
        )
        for name, (rate, shared) in self._limits.items():
            if shared and self._store_url() is None:
                raise MillpondError(self._no_store_message(name))
            self.gate.set_rate(name, rate, shared=shared)

    def start(self) -> None:
        for name, (rate, shared) in self._limits.items():
            log.info(
                "rate limit",
                task_name=name,
                rate_limit=describe_rate(rate),
                scope="global" if shared else "worker",
            )

    def stop(self) -> None:
        """Let go of the lanes (unacknowledged: they go back with the consumer's close) and of
        the shared store's connection."""
        self.drain()
        self.gate.close()

    # -- the limits ------------------------------------------------------------------------------
    def _initial_limits(self) -> dict[str, tuple[float | None, bool]]:
        """Each task's declared limit (none when `disable_rate_limits` is on), and its scope."""
        limits: dict[str, tuple[float | None, bool]] = {}
        if self.settings.disable_rate_limits:
            return limits
        for task in self.worker.app.tasks.values():
            rate = parse_rate(task.options.rate_limit)
            if rate is not None:
                limits[task.name] = (rate, self._shared_scope(task.name))
        return limits

    def _shared_scope(self, task_name: str) -> bool:
        task = self.worker.app.tasks.get(task_name)
        scope = task.options.rate_limit_scope if task is not None else None
        return (scope or self.settings.rate_limit_scope) == "global"

    def set_rate_limit(self, task_name: str, rate: str | float | None) -> None:
        """Change a task's rate limit at run time (Celery's `rate_limit` control command):
        `"10/m"`, `"5/s"`, `"100/h"`, a number per second, or None/""/0 for no limit. Safe from
        any thread; takes effect on the consumer loop's next turn.

        Raises `InvalidRateLimit` for a rate Celery would not take, `UnknownTask` for a task this
        worker does not have, and `ConfigurationError` for a global limit with no shared store.
        """
        per_second = parse_rate(rate)
        app = self.worker.app
        if task_name not in app.tasks:
            raise UnknownTask(f"unknown task {task_name!r}: not registered in app {app.name!r}")
        shared = self._shared_scope(task_name)
        if per_second is not None and shared and self._store_url() is None:
            raise ConfigurationError(self._no_store_message(task_name))
        if self.settings.disable_rate_limits and per_second is not None:
            log.warning(
                "rate limit set while disable_rate_limits is on: it is kept",
                task_name=task_name,
                rate_limit=describe_rate(per_second),
            )
        with self._lock:
            self._limits[task_name] = (per_second, shared)
        log.info("rate limit changed", task_name=task_name, rate_limit=describe_rate(per_second))
        self.worker.call_soon(lambda: self._apply(task_name))

    def rate_limit_of(self, task_name: str) -> float | None:
        """The task's current limit in tokens per second (None: no limit)."""
        with self._lock:
            return self._limits.get(task_name, (None, False))[0]

    def _apply(self, task_name: str) -> None:
        """A change from `set_rate_limit`, on the loop's thread (the window follows next turn)."""
        with self._lock:
            rate, shared = self._limits.get(task_name, (None, False))
        self._freed.extend(self.gate.set_rate(task_name, rate, shared=shared))

    def _store_url(self) -> str | None:
        url = self.settings.rate_limit_store or self.worker.app.broker_url
        if not url:
            return None
        scheme = plugins.scheme_of(url)
        return url if scheme in plugins.installed(plugins.LIMITERS) else None

    def _no_store_message(self, task_name: str) -> str:
        installed = ", ".join(plugins.installed(plugins.LIMITERS)) or "none"
        return (
            f'{task_name}: a global rate limit (rate_limit_scope = "global") needs a shared '
            "store, and neither rate_limit_store nor the broker URL names one that an installed "
            f"limiter serves (installed: {installed}); "
            'set rate_limit_store = "redis://..." (pip install millpond-broker-redis)'
        )

    def _shared_limiter(self) -> SharedLimiter:
        url = self._store_url()
        assert url is not None  # checked before any shared lane exists
        return limiter_for_url(url, self.settings.plugin_options(plugins.scheme_of(url)))

    # -- holding tasks back (the component contract) ---------------------------------------------
    def may_hold(self, task_name: str) -> bool:
        return self.gate.limited(task_name)

    def hold(self, job: Job) -> bool:
        return self.gate.admit(job)

    def release(self) -> Job | None:
        """A job whose token is there; an early ack (acks_late off) deferred by `may_hold` is
        made now that it starts."""
        if self._freed:
            job: Job | None = self._freed.popleft()
        else:
            job = self.gate.take() if self.gate.lanes else None
        worker = self.worker
        if job is None or job.delivery is None:
            return job
        if worker.receiver.acks_early(worker.app.tasks.get(job.task_name)):
            worker.acks.ack_now([job.delivery])
            job.delivery = None
        return job

    def next_release(self) -> float | None:
        return 0.0 if self._freed else self.gate.next_due()

    def tend(self) -> None:
        """Once a second: messages that waited `rate_limit_max_hold` go back to the broker (all
        of them while the consumer waits to be swapped for another queue set: it can only be
        closed once nothing it delivered is held)."""
        if not self.gate.lanes:
            return
        now, closing = time.monotonic(), self.worker.closing
        if now - self._stale_check < _TEND_EVERY and not closing:
            return
        self._stale_check = now
        sent = self.gate.send_back_stale(everything=closing)
        if sent:
            log.info(
                "rate-limited messages waited too long in the worker; handed back to the broker",
                count=sent,
                max_hold=self.settings.rate_limit_max_hold,
            )

    def held(self) -> list[Job]:
        """A copy, from any thread: taken again while the loop changes the lanes under it."""
        for _ in range(10):
            try:
                return [*self._freed, *self.gate.jobs()]
            except RuntimeError:
                continue
        return []

    def drain(self) -> list[Job]:
        jobs = list(self._freed)
        self._freed.clear()
        return jobs + self.gate.drain()

    def window_room(self, *, opening: bool = False) -> int:
        """What the lanes hold, rounded up to a step, plus one step of room for the next limited
        messages (never past the lanes' room; all of it for a new consumer).

        Following what the lanes hold, rather than opening their whole room at once, keeps a
        RabbitMQ worker from being pushed messages of any task beyond its prefetch count while
        its lanes are empty. The step keeps resizes (a round trip on RabbitMQ) to one per
        `parking / 4` messages parked or taken, as Celery batches its QoS changes.
        """
        gate = self.gate
        if opening:
            return gate.room
        if not gate.lanes:
            return 0
        step = max(1, gate.parking // 4)
        return min(gate.room, -(-gate.beside_window // step) * step + step)

    def beside_window(self) -> int:
        return self.gate.beside_window if self.gate.lanes else 0

    def describe_task(self, task_name: str) -> str:
        with self._lock:
            rate, shared = self._limits.get(task_name, (None, False))
        if rate is None:
            return ""
        return f"  [rate_limit {describe_rate(rate)}{', global' if shared else ''}]"

    # -- the broker ------------------------------------------------------------------------------
    def _hand_back(self, job: Job, delay: float) -> bool:
        """Give a rate-limited message back to the broker, due in `delay` seconds, and ack it."""
        acks = self.worker.acks
        broker = self.worker.app.broker
        delivery = job.delivery
        if delivery is None or acks is None or not broker.supports_delay:
            return False
        try:
            broker.publish(delivery.queue, delivery.message, eta=time.time() + delay)
        except Exception as exc:
            log.warning(
                "could not hand a rate-limited message back to the broker; it waits here",
                task_id=job.task_id,
                task_name=job.task_name,
                error=f"{type(exc).__name__}: {exc}",
            )
            return False
        acks.ack_later([delivery])
        return True
