"""What consumers that own their round trips share: keeping their lease, riding out an outage.

`LeaseKeeper`: brokers without a connection-bound acknowledgement (Redis, PostgreSQL, Zookeeper)
hold a fetched message under a consumer lease, renewed from a thread and connection of its own so
that a task running inline in the loop thread (the solo pool) for hours never lets it lapse; a
beat also gives back the messages of consumers whose lease expired. What one beat does is the
broker's (a Redis script, a SQL statement); when to beat and what to log lives here.

`Outage` is a consumer's broker outage, said once (Redis, PostgreSQL): whether its connection is
failing, and a doubling pause before the next attempt that waits on the loop's `Waker` (a
completion still interrupts it; its ack is kept for the next round trip).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from millpond.contracts.waking import Waker


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


class Outage:
    """Connection trouble of consumer `name` ("redis") with `where` (the masked URL); pauses
    double from `first` to `most` seconds while it lasts."""

    def __init__(
        self, log: logging.Logger, name: str, where: str, first: float = 0.05, most: float = 2.0
    ) -> None:
        self._log, self._name, self._where = log, name, where
        self._first, self._most = first, most
        self._delay = first
        #: from a failed round trip until the next one succeeds (the readiness probe reads it)
        self.failing = False

    def began(self, what: str, exc: BaseException, *, lasting: bool = False) -> None:
        """A round trip failed; `lasting` when retrying will not clear it up by itself."""
        if not self.failing:
            said = f"{type(exc).__name__}: {str(exc).strip()}"
            if lasting:
                self._log.error(
                    "%s: %s failed: %s said %s; retrying, but this will not clear up by itself: "
                    "check the server (credentials, ACLs, configuration)",
                    self._name,
                    what,
                    self._where,
                    said,
                )
            else:
                self._log.warning(
                    "%s: %s failed (%s); consuming continues once %s answers again "
                    "(acknowledgements are kept and sent then)",
                    self._name,
                    what,
                    said,
                    self._where,
                )
        self.failing = True

    def refused(self, what: str, exc: BaseException) -> None:
        """One ack or reject refused, not for the connection: dropped rather than block the later
        ones. Nothing is lost: the message stays reserved and returns to its queue when the
        consumer closes or its lease expires (so it may run again)."""
        self._log.error(
            "%s: %s refused by %s (%s: %s); the message(s) stay reserved and return to "
            "their queue when this consumer closes",
            self._name,
            what,
            self._where,
            type(exc).__name__,
            str(exc).strip(),
        )

    def over(self) -> None:
        """A round trip succeeded."""
        if self.failing:
            self._log.info("%s: connection to %s is back", self._name, self._where)
        self.failing = False
        self._delay = self._first

    def pause(self, deadline: float, waker: Waker | None) -> None:
        """After a failure: wait a growing while, never past `deadline` (monotonic)."""
        delay = min(self._delay, max(0.0, deadline - time.monotonic()))
        self._delay = min(self._delay * 2, self._most)
        if delay > 0:
            if waker is not None:
                waker.wait(delay)
            else:
                time.sleep(delay)
