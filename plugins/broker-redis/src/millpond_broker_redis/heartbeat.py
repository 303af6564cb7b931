"""The lease keeper: a thread that proves a consumer is alive and gives back dead ones' messages.

It runs beside the consumer loop with its own connection, so a task running inline in the loop
thread (the solo pool) for hours never lets the lease lapse. Each beat is one script: refresh this
consumer's lease key (TTL = lease_timeout), then, at most once per gate period across every consumer
on the server, return the held messages of consumers whose lease key has expired.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

log = logging.getLogger("millpond.broker.redis")


class Heartbeat(threading.Thread):
    def __init__(self, beat: Callable[[], tuple[bool, int]], interval: float, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._beat = beat
        self._interval = interval
        self._stop_event = threading.Event()
        self._failing = False
        self._beaten = False  # the first beat creates the lease: "not alive" is expected then

    def beat_once(self) -> None:
        """One beat; errors are logged, never raised (the next beat tries again)."""
        try:
            alive, restored = self._beat()
        except redis.RedisError as exc:
            if not self._failing:
                log.warning(
                    "redis: heartbeat failed (%s); retrying every %.1f s. If Redis stays "
                    "unreachable past lease_timeout, this consumer's messages may be redelivered",
                    exc,
                    self._interval,
                )
            self._failing = True
            return
        except Exception:  # a bug must not kill the lease silently
            log.exception("redis: heartbeat raised unexpectedly")
            return
        if self._failing:
            log.info("redis: heartbeat reaches Redis again")
            self._failing = False
        if not alive and self._beaten:
            log.warning(
                "redis: this consumer's lease had lapsed (no heartbeat reached Redis within "
                "lease_timeout); messages it held may have been given to other consumers"
            )
        self._beaten = True
        if restored > 0:
            log.warning(
                "redis: gave back %d message(s) held by consumer(s) whose lease expired", restored
            )

    def run(self) -> None:
        while not self._stop_event.wait(self._interval):
            self.beat_once()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=10)
