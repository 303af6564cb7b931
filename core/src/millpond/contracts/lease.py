"""The lease keeper brokers share: a thread that proves a consumer is alive and gives back the
messages of consumers that are not.

Brokers without a connection-bound acknowledgement (Redis, PostgreSQL) hold a fetched message under
a consumer lease that must be renewed while the worker lives. The renewal runs in a thread of its
own, beside the consumer loop and on its own connection, so a task running inline in the loop
thread (the solo pool) for hours never lets the lease lapse. What one beat does is the broker's
(one Redis script, one SQL statement); when to beat, what to log and when to stay quiet is the
same everywhere, and lives here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BeatResult:
    """What one beat found: the lease had lapsed before it (a new one was taken), and how many
    messages of consumers whose lease expired it gave back to their queues."""

    lapsed: bool
    restored: int


@dataclass(frozen=True, slots=True)
class LeaseServer:
    """Who the keeper talks to, for its log lines: `broker` prefixes them ("redis"), `server`
    names the other end ("Redis", "the server"); `transient` are the errors a later beat may
    cure (logged once, then quiet until it works again)."""

    broker: str
    server: str
    transient: tuple[type[BaseException], ...]
    log: logging.Logger


class LeaseKeeper(threading.Thread):
    """Beats every `interval` seconds until `stop()`; errors are logged, never raised."""

    def __init__(
        self, beat: Callable[[], BeatResult], interval: float, server: LeaseServer, name: str
    ) -> None:
        super().__init__(name=name, daemon=True)
        self._beat = beat
        self._interval = interval
        self._server = server
        self._stop_event = threading.Event()
        self._failing = False
        self._beaten = False  # the first beat creates the lease: "lapsed" is expected then

    def beat_once(self, *, strict: tuple[type[BaseException], ...] = ()) -> None:
        """One beat. Errors in `strict` are raised (the consumer's first beat raises a refusal of
        the credentials, so a worker that may not use the broker stops at start-up); any other
        error is logged and the next beat tries again."""
        s = self._server
        try:
            result = self._beat()
        except strict:
            raise
        except s.transient as exc:
            if not self._failing:
                s.log.warning(
                    "%s: heartbeat failed (%s); retrying every %.1f s. If %s stays unreachable "
                    "past lease_timeout, this consumer's messages may be redelivered",
                    s.broker,
                    str(exc).strip(),
                    self._interval,
                    s.server,
                )
            self._failing = True
            return
        except Exception:  # a bug must not kill the lease silently
            s.log.exception("%s: heartbeat raised unexpectedly", s.broker)
            return
        if self._failing:
            s.log.info("%s: heartbeat reaches %s again", s.broker, s.server)
            self._failing = False
        if result.lapsed and self._beaten:
            s.log.warning(
                "%s: this consumer's lease had lapsed (no heartbeat reached %s within "
                "lease_timeout); messages it held may have been given to other consumers",
                s.broker,
                s.server,
            )
        self._beaten = True
        if result.restored > 0:
            s.log.warning(
                "%s: gave back %d message(s) held by consumer(s) whose lease expired",
                s.broker,
                result.restored,
            )

    def run(self) -> None:
        while not self._stop_event.wait(self._interval):
            self.beat_once()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=10)
