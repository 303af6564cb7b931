"""A consumer's broker outage, said once: whether its connection is failing, and a doubling pause
before the next attempt that waits on the loop's `Waker` (a completion still interrupts it; its
ack is kept for the next round trip). Shared by the consumers that own their round trips (Redis,
PostgreSQL).
"""

from __future__ import annotations

import logging
import time

from millpond.contracts.waking import Waker


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
