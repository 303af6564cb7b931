"""The event emitter: one daemon thread that sends a worker's events, so no caller ever waits on
the broker for one.

Callers (the hooks, on the consumer loop's thread and the pool's completion threads) only append
an event to a bounded buffer: a few hundred nanoseconds, never I/O, never a lock held across a
send. The thread wakes every `interval` (early only when half the buffer is used), stamps what
is waiting with the worker's hostname, pid, utcoffset and Lamport clock, and publishes it in
messages of at most `batch` events: one event as itself, several task events as one `task.multi`
list (Celery's batching, which every `EventReceiver` reads). It also sends `worker-online` when it
starts, `worker-heartbeat` every `freq` seconds, and `worker-offline` when it stops.

A broker that does not take events (down, unreachable) must not cost memory without bound: what
could not be sent is kept and retried with a growing pause, up to `limit` events in all; past that
new events are dropped and counted, with a warning when dropping starts and one saying how many
were lost once the broker takes events again. Heartbeats are never kept (a stale heartbeat says
nothing); a worker whose broker is away looks offline to monitors, which is the truth.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from millpond_control import events

log = structlog.get_logger("millpond.events")

#: publishes one event message: (routing key, JSON body); raises when the broker did not take it
Publish = Callable[[str, bytes], None]


class Clock(Protocol):
    """The worker's Lamport clock (shared with its remote control, which adjusts it)."""

    def forward(self) -> int: ...


#: makes a worker event (`worker-online`, `worker-heartbeat`, `worker-offline`) with the worker's
#: current numbers
WorkerEvent = Callable[[str], events.Pending]

#: the longest pause between two tries of a broker that refuses events
MAX_BACKOFF = 5.0
#: seconds between two warnings about dropped events
DROP_REPORT_EVERY = 10.0


#: compact and without the circular-reference check (event dicts are flat and built here), which
#: is a tenth less encoding per event; an odd value (a custom type in a header) becomes its repr
_encoder = json.JSONEncoder(default=repr, check_circular=False, separators=(",", ":"))


def _dumps(value: Any) -> bytes:
    return _encoder.encode(value).encode()


class Emitter:
    """Sends one worker's events from a thread of its own; see the module docstring."""

    def __init__(
        self,
        publish: Publish,
        *,
        hostname: str,
        clock: Clock,
        worker_event: WorkerEvent,
        freq: float = 2.0,
        limit: int = 10_000,
        batch: int = 100,
        interval: float = 0.1,
    ) -> None:
        self.publish = publish
        self.hostname = hostname
        self.clock = clock
        self.worker_event = worker_event
        self.freq = freq
        self.limit = limit
        self.batch = batch
        self.interval = interval
        #: how many waiting events wake the thread before its `interval` is up: waking it for
        #: every batch would hand the GIL back and forth with the consumer loop for nothing
        self._early = max(batch, limit // 2)
        self.pid = os.getpid()
        self._pending: deque[events.Pending] = deque()
        #: stamped messages the broker refused, oldest first: (routing key, body, events in it)
        self._unsent: deque[tuple[str, bytes, int]] = deque()
        self._unsent_events = 0
        self._drops = itertools.count()
        self._dropped_reported = 0
        self._drop_report_at = 0.0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._beat_now = False
        self._thread: threading.Thread | None = None
        self._failing: str | None = None
        self._retry_at = 0.0
        self._backoff = 0.0
        #: messages and events sent so far (for tests and the benchmark)
        self.sent_messages = 0
        self.sent_events = 0

    # -- any thread ------------------------------------------------------------------------------
    def put(self, pending: events.Pending) -> None:
        """Queue one task event; dropped (and counted) when `limit` events are already held."""
        held = len(self._pending)
        if held + self._unsent_events >= self.limit:
            next(self._drops)
            return
        self._pending.append(pending)
        if held + 1 == self._early:
            self._wake.set()  # filling up faster than `interval` drains it: send now

    def heartbeat_now(self) -> None:
        """Send a `worker-heartbeat` at once (the `heartbeat` remote-control command)."""
        self._beat_now = True
        self._wake.set()

    @property
    def dropped(self) -> int:
        """Events dropped so far because the buffer was full."""
        # itertools.count has no public value: its repr is "count(N)"
        return int(repr(self._drops)[6:-1])

    @property
    def held(self) -> int:
        """Events waiting to be sent (queued, or refused by the broker and kept to retry)."""
        return len(self._pending) + self._unsent_events

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="millpond-events", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is waiting and `worker-offline`, waiting at most `timeout` seconds for it."""
        self._stopping.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning(
                    "events were not all sent before the worker stopped",
                    waiting=self.held,
                    timeout=timeout,
                )

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        self._send_worker("worker-online")
        next_beat = time.monotonic() + self.freq
        wake, stopping = self._wake, self._stopping
        while not stopping.is_set():
            wake.wait(max(0.0, min(self.interval, next_beat - time.monotonic())))
            wake.clear()
            now = time.monotonic()
            if now >= next_beat or self._beat_now:
                self._beat_now = False
                self._send_worker("worker-heartbeat")
                next_beat = now + self.freq
            self._flush()
        self._retry_at = 0.0  # one last try, whatever the backoff said
        self._flush()
        self._send_worker("worker-offline")
        self._report_drops(final=True)
        log.info(
            "event sender stopped",
            messages=self.sent_messages,
            events=self.sent_events,
            dropped=self.dropped,
            unsent=self.held,
        )

    def _send_worker(self, event_type: str) -> None:
        try:
            pending = self.worker_event(event_type)
        except Exception:
            log.exception("could not make a worker event", event=event_type)
            return
        event = events.stamp(
            pending, self.hostname, events.utcoffset(), self.pid, self.clock.forward()
        )
        self._send(events.routing_key(event_type), _dumps(event), 0)

    def _send(self, key: str, body: bytes, count: int) -> bool:
        """Publish one message; False (and the outage noted) when the broker refused it."""
        try:
            self.publish(key, body)
        except Exception as exc:
            self._failed(exc)
            return False
        self.sent_messages += 1
        self.sent_events += count or 1
        if self._failing is not None:
            log.info("events reach the broker again", was=self._failing)
            self._failing = None
            self._backoff = 0.0
        return True

    def _failed(self, exc: BaseException) -> None:
        why = f"{type(exc).__name__}: {exc}"
        if self._failing is None:
            log.warning(
                "the broker did not take an event message; keeping events to retry",
                error=why,
                keeping_at_most=self.limit,
            )
        self._failing = why
        self._backoff = min(MAX_BACKOFF, max(0.25, self._backoff * 2))
        self._retry_at = time.monotonic() + self._backoff

    def _flush(self) -> None:
        """Send what the broker refused before, then what is queued, in batches of `batch`."""
        if self._retry_at and time.monotonic() < self._retry_at:
            self._report_drops()
            return
        self._retry_at = 0.0
        unsent = self._unsent
        while unsent:
            key, body, count = unsent[0]
            if not self._send(key, body, count):
                self._report_drops()
                return
            unsent.popleft()
            self._unsent_events -= count
        pending = self._pending
        batch = self.batch
        while pending:
            count = min(len(pending), batch)
            taken = [pending.popleft() for _ in range(count)]
            offset = events.utcoffset()
            host, pid, tick = self.hostname, self.pid, self.clock.forward
            stamped = [events.stamp(p, host, offset, pid, tick()) for p in taken]
            if count == 1:
                key, body = events.routing_key(taken[0]["type"]), _dumps(stamped[0])
            else:
                key, body = "task.multi", _dumps(stamped)
            if not self._send(key, body, count):
                unsent.append((key, body, count))
                self._unsent_events += count
                break
        self._report_drops()

    def _report_drops(self, *, final: bool = False) -> None:
        """A warning saying how many events were dropped since the last one (at most one every
        `DROP_REPORT_EVERY` seconds, and one when the emitter stops)."""
        dropped = self.dropped
        if dropped == self._dropped_reported:
            return
        now = time.monotonic()
        if not final and now < self._drop_report_at:
            return
        self._drop_report_at = now + DROP_REPORT_EVERY
        new = dropped - self._dropped_reported
        self._dropped_reported = dropped
        log.warning(
            "event buffer full: events dropped",
            dropped=new,
            dropped_total=dropped,
            limit=self.limit,
            broker_error=self._failing,
        )
