"""What consumers that own their round trips, with no connection-bound acknowledgement (Redis,
PostgreSQL, Zookeeper), share: keeping their lease and riding out an outage. Both log to
`millpond.broker.<name>` as `name` ("redis"), naming the other end by `where` (the masked URL).
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
    """Whether the lease had lapsed (a new one was taken), and how many messages of consumers
    whose lease expired the beat gave back."""

    lapsed: bool
    restored: int


#: what a consumer's outage means while it lasts, and an outage that will not end by itself
_ACKS_WAIT = "consuming continues once it answers (acknowledgements are kept and sent then)"
_LASTING = "retrying, but it will not clear up by itself: check credentials, ACLs, configuration"


class Outage:
    """Connection trouble of consumer `name` with `where`, said once; pauses double from `first`
    to `most` seconds while it lasts, waiting on the loop's `Waker` (a completion still
    interrupts one; its ack is kept for the next round trip)."""

    def __init__(self, name: str, where: str, first: float = 0.05, most: float = 2.0) -> None:
        self.log = logging.getLogger(f"millpond.broker.{name}")
        self.name, self.where = name, where
        self._first, self._most, self._delay = first, most, first
        #: from a failed round trip until the next one succeeds (the readiness probe reads it)
        self.failing = False

    def began(
        self, what: str, exc: BaseException, *, lasting: bool = False, then: str = _ACKS_WAIT
    ) -> None:
        """A round trip failed; `then` says what that means meanwhile, unless `lasting` (retrying
        will not clear it up by itself), logged as an error."""
        if not self.failing:
            level, then = (logging.ERROR, _LASTING) if lasting else (logging.WARNING, then)
            said = f"{type(exc).__name__}: {str(exc).strip()}"
            self.log.log(
                level, "%s: %s failed on %s (%s); %s", self.name, what, self.where, said, then
            )
        self.failing = True

    def refused(self, what: str, exc: BaseException) -> None:
        """One ack or reject refused, not for the connection: dropped rather than block later ones;
        the message stays reserved until the consumer closes or its lease lapses (may run again)."""
        self.log.error(
            "%s: %s refused by %s (%s: %s); the message(s) stay reserved and return to "
            "their queue when this consumer closes",
            self.name,
            what,
            self.where,
            type(exc).__name__,
            str(exc).strip(),
        )

    def over(self) -> None:
        """A round trip succeeded."""
        if self.failing:
            self.log.info("%s: connection to %s is back", self.name, self.where)
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


class LeaseKeeper(threading.Thread):
    """Renews a consumer's lease every `interval` seconds until `stop()`, on a thread and connection
    of its own, so a task running inline in the loop thread (solo) for hours never lets it lapse; a
    beat (the broker's: a Redis script, a SQL statement) also gives back the messages of consumers
    whose lease expired. Errors are logged, never raised (`transient` ones as an `Outage`)."""

    def __init__(
        self,
        beat: Callable[[], BeatResult],
        interval: float,
        name: str,
        where: str,
        transient: tuple[type[BaseException], ...],
    ) -> None:
        super().__init__(name=f"millpond-{name}-lease", daemon=True)
        self._beat, self._interval, self._transient = beat, interval, transient
        self._outage = Outage(name, where)
        self._stop_event = threading.Event()
        self._beaten = False  # the first beat creates the lease: "lapsed" is expected then

    def beat_once(self, *, strict: tuple[type[BaseException], ...] = ()) -> None:
        """One beat. Errors in `strict` are raised (a consumer's first beat, so refused credentials
        stop the worker at start-up); others are logged and the next beat tries again."""
        said = self._outage
        try:
            result = self._beat()
        except strict:
            raise
        except self._transient as exc:
            then = f"retrying every {self._interval:.1f} s; past lease_timeout this consumer's "
            said.began("heartbeat", exc, then=then + "messages may be redelivered")
            return
        except Exception:  # a bug must not kill the lease silently
            said.log.exception("%s: heartbeat raised unexpectedly", said.name)
            return
        said.over()
        if result.lapsed and self._beaten:
            said.log.warning(
                "%s: this consumer's lease had lapsed (no heartbeat reached %s within "
                "lease_timeout); messages it held may have been given to other consumers",
                said.name,
                said.where,
            )
        self._beaten = True
        if result.restored > 0:
            said.log.warning(
                "%s: gave back %d message(s) held by consumer(s) whose lease expired",
                said.name,
                result.restored,
            )

    def run(self) -> None:
        while not self._stop_event.wait(self._interval):
            self.beat_once()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=10)
