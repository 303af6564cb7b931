"""The lease keeper brokers share: a thread that proves a consumer is alive and gives back the
messages of consumers that are not.

Brokers without a connection-bound acknowledgement (Redis, PostgreSQL, Zookeeper) hold a fetched
message under a consumer lease renewed while the worker lives, from a thread and connection of its
own, so a task running inline in the loop thread (the solo pool) for hours never lets it lapse.
What one beat does is the broker's (a Redis script, a SQL statement); when to beat and what to log
is the same everywhere, and lives here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BeatResult:
    """What one beat found: whether the lease had lapsed (a new one was taken), and how many
    messages of consumers whose lease expired it gave back."""

    lapsed: bool
    restored: int


@dataclass(frozen=True, slots=True)
class LeaseServer:
    """For the keeper's log lines: `broker` prefixes them ("redis"), `server` names the other end
    ("Redis", "the server"); `transient` errors are logged once, then quiet until a beat works."""

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
        """One beat. Errors in `strict` are raised (a consumer's first beat, so refused credentials
        stop the worker at start-up); others are logged and the next beat tries again."""
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
