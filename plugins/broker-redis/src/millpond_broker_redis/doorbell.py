"""Waiting on empty queues without polling and without ever taking a message off a queue.

A consumer whose queues are empty must wake the moment a message arrives (kombu's producers only
LPUSH, they send no notification), when a delayed message becomes due, or when its `Waker` fires.

The wait uses one "doorbell" connection per list key, blocked in `BLMOVE key key RIGHT RIGHT`: with
source and destination the same list and the same end, Redis pops the front element and pushes it
straight back, so the command wakes as soon as the list is non-empty but leaves the list exactly as
it was. The doorbell takes nothing, so a connection that dies mid-reply loses nothing; the message
is then reserved by the fetch script, atomically. The price: every consumer blocked on a key is
woken by one push (all but one find nothing and wait again), and one connection per key while idle.

On Redis Cluster each doorbell connects to the node serving its key, looked up each time it is
armed afresh, so after a failover it blocks on the new primary; the bells' subscription may sit on
any node, as a PUBLISH reaches every node of a cluster.

Delayed messages ring a pub/sub bell (`millpond:bell:<queue>`) when one becomes the earliest, so a
consumer already waiting for a later eta recomputes its deadline.
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.client import PubSub

from millpond.contracts.waking import Waker
from millpond_broker_redis.connection import ACCESS_ERRORS

log = logging.getLogger("millpond.broker.redis")

#: how long to wait between looks when the doorbells cannot be armed
_FALLBACK = 0.25

RING = "ring"
WOKEN = "woken"
TIMEOUT = "timeout"


def _new_connection(pool: redis.ConnectionPool) -> Any:
    return pool.connection_class(**pool.connection_kwargs)


class _Bell:
    """One doorbell connection on one list key, opened on the node serving it when first armed."""

    __slots__ = ("conn", "key", "pool_for", "sent_at")

    def __init__(self, pool_for: Callable[[str], redis.ConnectionPool], key: str) -> None:
        self.pool_for = pool_for
        self.conn: Any = None
        self.key = key
        self.sent_at: float | None = None

    def arm(self, block: float) -> None:
        if self.sent_at is None:
            if self.conn is None:
                self.conn = _new_connection(self.pool_for(self.key))
            # connect() first: send_command() alone would connect to the configured host and
            # skip a sentinel-managed connection's lookup of the current primary
            self.conn.connect()
            self.conn.send_command("BLMOVE", self.key, self.key, "RIGHT", "RIGHT", block)
            self.sent_at = time.monotonic()

    def fileno(self) -> int:
        sock = None if self.conn is None else self.conn._sock
        if sock is None:
            raise redis.ConnectionError(f"doorbell connection for {self.key!r} is closed")
        return int(sock.fileno())

    def read(self) -> None:
        try:
            self.conn.read_response()
        finally:
            self.sent_at = None

    def reset(self) -> None:
        self.sent_at = None
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.disconnect()
            except Exception:
                pass


class Doorbells:
    """The blocking side of one consumer: doorbells on its list keys, plus its delayed bell."""

    def __init__(
        self,
        pool_for: Callable[[str], redis.ConnectionPool],
        keys: Sequence[str],
        channels: Sequence[str],
        idle_timeout: float,
        socket_timeout: float,
    ) -> None:
        self._pool_for = pool_for
        self._bells = [_Bell(pool_for, k) for k in keys]
        self._channels = list(channels)
        self._pubsub: PubSub | None = None
        self._block = idle_timeout
        # a reply later than this means the connection is dead without the socket knowing yet
        self._stale_after = idle_timeout + socket_timeout
        self._arm_failed = False

    def _subscription(self) -> PubSub:
        if self._pubsub is None:
            pool = self._pool_for(self._channels[0])
            pubsub = PubSub(pool, ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(*self._channels)
            except BaseException:
                pubsub.close()
                raise
            self._pubsub = pubsub
        return self._pubsub

    def drain(self) -> None:
        """Discard bells rung while the consumer was busy (the fetch about to run sees the news)."""
        if self._pubsub is None:
            return
        try:
            while self._pubsub.get_message(timeout=0.0) is not None:
                pass
        except ACCESS_ERRORS:  # NOPERM on the bell channel: the consumer stops, saying why
            self._reset_pubsub()
            raise
        except redis.RedisError:
            self._reset_pubsub()

    def wait(self, timeout: float, waker: Waker | None) -> str:
        """Block until a doorbell or bell rings (RING), `waker` fires (WOKEN) or `timeout` passes.

        Connection trouble counts as RING: the caller's next fetch then meets the error itself.
        A refused permission (`ACCESS_ERRORS`: NOPERM on BLMOVE or the bell channel) is raised:
        waiting cannot cure it, and the bells would otherwise stay silently deaf.
        """
        if waker is not None and waker.is_set:
            return WOKEN
        if self._collect():
            return RING  # a reply may be newer than the fetch that just ran: look again
        now = time.monotonic()
        try:
            pubsub = self._subscription()
            fds: list[Any] = []
            for bell in self._bells:
                if bell.sent_at is not None and now - bell.sent_at > self._stale_after:
                    log.warning(
                        "redis: no reply from a blocked connection in %.0f s; reconnecting",
                        now - bell.sent_at,
                    )
                    bell.reset()
                bell.arm(self._block)
                fds.append(bell)
            ps_conn = pubsub.connection
            if ps_conn is None or ps_conn._sock is None:
                raise redis.ConnectionError("bell subscription is not connected")
            fds.append(ps_conn._sock)
        except ACCESS_ERRORS:
            self.reset()
            raise
        except redis.RedisError as exc:
            # Redis is away (the caller's next fetch reports it) or refuses more connections
            # (maxclients): wait a little instead of spinning, then let the caller look again.
            if not self._arm_failed:
                log.warning(
                    "redis: cannot wait for messages on dedicated connections (%s); "
                    "looking again every %.2f s until that works",
                    exc,
                    _FALLBACK,
                )
            self._arm_failed = True
            self.reset()
            if waker is not None:
                return WOKEN if waker.wait(min(timeout, _FALLBACK)) else RING
            time.sleep(max(0.0, min(timeout, _FALLBACK)))
            return RING
        self._arm_failed = False
        if waker is not None:
            fds.append(waker)
        try:
            ready, _, _ = select.select(fds, [], [], max(timeout, 0.0))
        except (OSError, ValueError, redis.RedisError):
            self.reset()
            return RING
        if not ready:
            return TIMEOUT
        outcome = WOKEN if waker is not None and waker in ready else TIMEOUT
        for item in ready:
            if isinstance(item, _Bell):
                try:
                    item.read()
                except ACCESS_ERRORS:
                    self.reset()
                    raise
                except redis.RedisError:
                    item.reset()
                outcome = RING
            elif item is not waker:
                outcome = RING  # the pub/sub socket; drained before the next fetch
        return outcome

    def _collect(self) -> bool:
        """Read replies that arrived while the consumer was not waiting; True if there were any.

        Most are old news (the fetch that just ran saw those messages), but one may have arrived
        after that fetch, so the caller looks again rather than block. Reading them also keeps
        an unanswered-looking doorbell from being mistaken for a dead connection.
        """
        waiting = [bell for bell in self._bells if bell.sent_at is not None]
        if not waiting:
            return False
        try:
            ready, _, _ = select.select(waiting, [], [], 0)
        except (OSError, ValueError, redis.RedisError):
            self.reset()
            return True
        for bell in ready:
            try:
                bell.read()
            except ACCESS_ERRORS:
                self.reset()
                raise
            except redis.RedisError:
                bell.reset()
        return bool(ready)

    def _reset_pubsub(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except Exception:
                pass
            self._pubsub = None

    def reset(self) -> None:
        for bell in self._bells:
            bell.reset()
        self._reset_pubsub()

    def close(self) -> None:
        self.reset()
