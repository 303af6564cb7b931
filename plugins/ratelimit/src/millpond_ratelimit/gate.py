"""Rate limits in the worker: limited tasks wait beside the prefetch window, never inside it.

Celery keeps a rate-limited task's messages in its prefetch window while they wait for a token, so
a flood of one limited task fills the window and every other task on the queue stops. Here each
limited task has a *lane*: its messages wait in the lane, unacknowledged, and the lane sits outside
the window (the worker widens the broker's window by the lanes' room, and fetches as if parked
messages were not there). Unlimited tasks keep flowing at full speed beside a lane of any length.

A lane is bounded twice, so a flood cannot grow the worker's memory or outlive a broker lease:

* at most `parking` messages wait in a lane (the prefetch count by default);
* a message waits in the worker at most `max_hold` seconds: one that would wait longer (its
  predicted start is past that, the lane is full, or it already waited that long) goes back to the
  broker as a delayed message, due about when a token will be there for it (successive ones are
  spread at the task's rate, so they come back one by one rather than all at once). So no message
  stays unacknowledged long enough for RabbitMQ's `consumer_timeout` to close the channel, and on
  Redis the consumer's lease (refreshed by its heartbeat thread) covers the wait.

A token is taken only when the pool has a free slot for the job, so the limit holds for the moments
tasks *start*, which is what the task's own clock (and the API it protects) sees. Per-worker limits
are Celery's: a token bucket of capacity 1 per task per worker, refilled at the rate. A global limit
asks a `SharedLimiter` (one bucket per task for the whole fleet) instead.

Every method runs in the consumer loop's thread; the clock is injected, so tests need no sleeps.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import structlog

from millpond.contracts.pool import Job
from millpond_ratelimit.limiter import SharedLimiter

log = structlog.get_logger("millpond.worker")

Clock = Callable[[], float]
#: hand a job back to the broker, due in this many seconds; True when the broker took it
HandBack = Callable[[Job, float], bool]

#: seconds between asks of a shared store that could not be reached
_STORE_RETRY = 1.0


class TokenBucket:
    """Celery's per-worker bucket: `capacity` tokens, refilled at `rate` per second, full at start."""

    __slots__ = ("_stamp", "_tokens", "capacity", "clock", "rate")

    def __init__(
        self, rate: float, capacity: float = 1.0, *, clock: Clock = time.monotonic
    ) -> None:
        self.rate = rate
        self.capacity = capacity
        self.clock = clock
        self._tokens = capacity
        self._stamp = clock()

    def _refill(self) -> float:
        now = self.clock()
        if self._tokens < self.capacity:
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        return self._tokens

    def take(self) -> bool:
        """Take one token if there is one."""
        if self._refill() >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def wait(self) -> float:
        """Seconds until one token is there (0 when there is one now)."""
        return max(0.0, (1.0 - self._refill()) / self.rate)


@dataclass(slots=True)
class Lane:
    """One limited task: its rate, its bucket, and its messages waiting for a token."""

    task_name: str
    rate: float
    shared: bool
    bucket: TokenBucket | None
    #: (job, monotonic time it was parked), oldest first
    waiting: deque[tuple[Job, float]] = field(default_factory=deque)
    #: a shared lane does not ask its store again before this (the store said when)
    not_before: float = 0.0
    #: when the next message handed back to the broker is due (they are spread at the rate)
    horizon: float = 0.0
    #: of the waiting jobs, those still unacknowledged (all but early-acked ones)
    held: int = 0

    def push(self, job: Job, parked_at: float) -> None:
        self.waiting.append((job, parked_at))
        if job.delivery is not None:
            self.held += 1

    def pop(self) -> Job:
        job = self.waiting.popleft()[0]
        if job.delivery is not None:
            self.held -= 1
        return job

    def clear(self) -> list[Job]:
        jobs = [job for job, _ in self.waiting]
        self.waiting.clear()
        self.held = 0
        return jobs

    def predicted_wait(self, now: float) -> float:
        """Seconds until a message parked now would get its token (the lane's backlog first)."""
        first = self.bucket.wait() if self.bucket is not None else max(0.0, self.not_before - now)
        return first + len(self.waiting) / self.rate


class Gate:
    """The lanes of one worker's rate-limited tasks."""

    def __init__(
        self,
        *,
        parking: int,
        max_hold: float,
        hand_back: HandBack,
        shared: Callable[[], SharedLimiter] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if parking < 1:
            raise ValueError(f"parking must be at least 1, got {parking}")
        self.parking = parking
        self.max_hold = max_hold
        self.clock = clock
        self._hand_back = hand_back
        self._shared_factory = shared
        self._shared: SharedLimiter | None = None
        self._lanes: dict[str, Lane] = {}
        self._turn = 0
        self._store_failing = False
        #: messages handed back to the broker to wait there (a counter for tests and stats)
        self.handed_back = 0

    # -- limits ----------------------------------------------------------------------------------
    def set_rate(self, task_name: str, rate: float | None, *, shared: bool = False) -> list[Job]:
        """Limit a task to `rate` tokens per second (None: no limit). Returns the jobs that were
        waiting in a lane that is gone: the caller runs them like any other job."""
        lane = self._lanes.get(task_name)
        if rate is None:
            if lane is None:
                return []
            del self._lanes[task_name]
            return lane.clear()
        if shared and self._shared_factory is None:
            raise ValueError(
                f"{task_name}: a global rate limit needs a shared store (rate_limit_store)"
            )
        bucket = None if shared else TokenBucket(rate, clock=self.clock)
        if lane is None:
            self._lanes[task_name] = Lane(task_name, rate, shared, bucket)
        else:
            lane.rate, lane.shared, lane.bucket = rate, shared, bucket
            # the hand-back schedule was spaced at the old rate: the new one starts afresh
            lane.not_before = lane.horizon = 0.0
        return []

    def limited(self, task_name: str) -> bool:
        return task_name in self._lanes

    def rate_of(self, task_name: str) -> float | None:
        lane = self._lanes.get(task_name)
        return lane.rate if lane is not None else None

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    @property
    def room(self) -> int:
        """Messages the lanes may hold beside the prefetch window (what the broker's window
        is widened by)."""
        return self.parking * len(self._lanes)

    @property
    def parked(self) -> int:
        return sum(len(lane.waiting) for lane in self._lanes.values())

    @property
    def beside_window(self) -> int:
        """Parked messages that do not count against the prefetch window: those within their
        lane's room and still unacknowledged (one that overflowed because the broker would not
        take it back counts, as in Celery)."""
        return sum(min(lane.held, self.parking) for lane in self._lanes.values())

    def jobs(self) -> Iterator[Job]:
        """Every parked job (for inspection)."""
        for lane in self._lanes.values():
            for job, _ in lane.waiting:
                yield job

    # -- the flow --------------------------------------------------------------------------------
    def admit(self, job: Job) -> bool:
        """Take a job of a limited task into its lane (or hand it back to the broker); False when
        its task is not limited (the caller runs it as usual)."""
        lane = self._lanes.get(job.task_name)
        if lane is None:
            return False
        now = self.clock()
        wait = lane.predicted_wait(now)
        if len(lane.waiting) < self.parking and wait <= self.max_hold:
            lane.push(job, now)
            return True
        if not self._send_back(lane, job, now, wait):
            lane.push(job, now)  # the broker would not take it: it waits here
        return True

    def take(self) -> Job | None:
        """A parked job whose token is there now (the token is taken), or None."""
        lanes = self._lanes
        if not lanes:
            return None
        now = self.clock()
        order = list(lanes.values())
        start = self._turn % len(order)
        self._turn += 1
        for lane in order[start:] + order[:start]:
            if not lane.waiting:
                continue
            if lane.bucket is not None:
                if lane.bucket.take():
                    return lane.pop()
                continue
            if now < lane.not_before:
                continue
            wait = self._ask_store(lane, now)
            if wait <= 0.0:
                return lane.pop()
            lane.not_before = now + wait
        return None

    def next_due(self) -> float | None:
        """Seconds until some parked job may get its token (None: nothing is parked), so the
        loop wakes for it instead of on its next poll timeout."""
        now = self.clock()
        due: float | None = None
        for lane in self._lanes.values():
            if not lane.waiting:
                continue
            bucket = lane.bucket
            wait = bucket.wait() if bucket is not None else max(0.0, lane.not_before - now)
            due = wait if due is None else min(due, wait)
        return due

    def send_back_stale(self, *, everything: bool = False) -> int:
        """Hand back to the broker the jobs that waited `max_hold` seconds already (the pool was
        busy, or the fleet took the shared tokens): a message never stays unacknowledged in a
        lane much longer than that. `everything`: every waiting job, whatever its age (the
        consumer that delivered them is about to close). Returns how many went back."""
        now = self.clock()
        sent = 0
        for lane in self._lanes.values():
            waiting = lane.waiting
            kept: deque[tuple[Job, float]] = deque()
            while waiting:
                job, parked_at = waiting.popleft()
                fresh = now - parked_at <= self.max_hold and not everything
                if fresh or job.delivery is None:
                    kept.append((job, parked_at))
                    continue
                wait = (len(kept) + len(waiting)) / lane.rate
                if self._send_back(lane, job, now, wait):
                    sent += 1
                else:
                    kept.append((job, now))  # try again after another max_hold
            lane.waiting = kept
            lane.held = sum(1 for job, _ in kept if job.delivery is not None)
        return sent

    def drain(self) -> list[Job]:
        """Empty every lane (shutdown: the messages go back to the broker unacknowledged)."""
        out: list[Job] = []
        for lane in self._lanes.values():
            out.extend(lane.clear())
        return out

    # -- helpers ---------------------------------------------------------------------------------
    def _send_back(self, lane: Lane, job: Job, now: float, wait: float) -> bool:
        if job.delivery is None:
            return False  # acknowledged already (early ack): nothing to hand back
        delay = max(wait, lane.horizon - now, 0.0)
        if not self._hand_back(job, delay):
            return False
        lane.horizon = now + delay + 1.0 / lane.rate
        self.handed_back += 1
        return True

    def _ask_store(self, lane: Lane, now: float) -> float:
        try:
            if self._shared is None:
                assert self._shared_factory is not None
                self._shared = self._shared_factory()
            wait = self._shared.acquire(lane.task_name, lane.rate)
        except Exception as exc:
            if not self._store_failing:
                log.warning(
                    "rate limit store unreachable; limited tasks wait until it answers "
                    "(a global limit fails closed)",
                    task_name=lane.task_name,
                    error=f"{type(exc).__name__}: {exc}",
                )
            self._store_failing = True
            return _STORE_RETRY
        if self._store_failing:
            log.info("rate limit store answers again")
            self._store_failing = False
        return wait

    def close(self) -> None:
        if self._shared is not None:
            self._shared.close()
            self._shared = None
