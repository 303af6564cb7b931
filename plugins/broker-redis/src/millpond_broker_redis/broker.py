"""`RedisBroker`: publishing, delays, dead letters and administration on kombu's Redis layout.

Producing is safe from any thread (redis-py's pool is thread-safe) and after `os.fork()` (the pools
are rebuilt when the pid changes). A publish that cannot reach Redis is retried with exponential
backoff for `publish_retry_timeout` seconds, then raises `PublishError`. A retry after a timeout may
deliver a message twice (Redis may have taken the first attempt): at-least-once, like every retry.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import redis
from redis.commands.core import Script

from millpond import envelope
from millpond.broker import Broker
from millpond.exceptions import BrokerError, MalformedMessage, PublishError
from millpond.protocol import DEATH_REASON, Message
from millpond_broker_redis import keys, scripts
from millpond_broker_redis.backend import RedisResultBackend
from millpond_broker_redis.config import RedisConfig, parse
from millpond_broker_redis.connection import RETRYABLE, Pools
from millpond_broker_redis.consumer import RedisConsumer

log = logging.getLogger("millpond.broker.redis")

T = TypeVar("T")
#: the oldest server this plugin supports: RPOP with a count and BLMOVE arrived in Redis 6.2
MIN_REDIS = (6, 2)
_REPLAY_BATCH = 100


class Scripts:
    """The Lua scripts, registered once per broker; EVALSHA, reloaded after a server restart."""

    def __init__(self, client: redis.Redis) -> None:
        self.fetch = Script(client, scripts.FETCH)
        self.requeue = Script(client, scripts.REQUEUE)
        self.dead_letter = Script(client, scripts.DEAD_LETTER)
        self.close = Script(client, scripts.CLOSE)
        self.beat = Script(client, scripts.BEAT)
        self.delay = Script(client, scripts.DELAY)
        self.replay = Script(client, scripts.REPLAY)


class RedisBroker(Broker):
    schemes: ClassVar[tuple[str, ...]] = ("redis", "rediss", "redis+sentinel")
    system: ClassVar[str] = "redis"
    supports_delay: ClassVar[bool] = True
    #: kombu's emulation: priorities 0..9 in four lists; LOWER numbers are served first
    supports_priority: ClassVar[bool] = True

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self.cfg: RedisConfig = parse(url, self.options)
        self.pools = Pools(self.cfg)
        self.scripts = Scripts(self.pools.client())
        self._checked_version = False

    def __repr__(self) -> str:
        return f"<RedisBroker {self.cfg.masked_url}>"

    # -- plumbing --------------------------------------------------------------------------------
    def _retry(self, what: str, op: Callable[[redis.Redis], T], error: type[BrokerError]) -> T:
        """Run `op` with the process's client; on connection trouble back off and retry until
        `publish_retry_timeout` has passed, then raise `error` naming what failed and what to do."""
        deadline = time.monotonic() + self.cfg.publish_retry_timeout
        delay = 0.05
        attempts = 0
        while True:
            attempts += 1
            try:
                return op(self.pools.client())
            except RETRYABLE as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise error(
                        f"{what} failed: Redis at {self.cfg.masked_url} did not answer for "
                        f"{self.cfg.publish_retry_timeout:g}s ({attempts} attempts; last error "
                        f"{type(exc).__name__}: {exc}). Check that Redis is running and reachable; "
                        "the option publish_retry_timeout sets how long to keep trying"
                    ) from exc
                if attempts == 1:
                    log.warning("redis: %s failed (%s); retrying for up to %.0fs", what, exc, left)
                time.sleep(min(delay, left))
                delay = min(delay * 2, 2.0)
            except redis.RedisError as exc:
                raise error(f"{what} failed: Redis at {self.cfg.masked_url} said: {exc}") from exc

    def connect(self) -> None:
        self._retry("connecting", lambda c: c.ping(), BrokerError)
        self._check_version()

    def _check_version(self) -> None:
        if self._checked_version:
            return
        info = self._retry("reading the server version", lambda c: c.info("server"), BrokerError)
        text = str(info.get("redis_version", "0"))
        version = tuple(int(p) for p in text.split(".")[:2] if p.isdigit())
        if version < MIN_REDIS:
            raise BrokerError(
                f"Redis at {self.cfg.masked_url} is version {text}; millpond-broker-redis needs "
                f"{'.'.join(map(str, MIN_REDIS))} or newer (RPOP with a count, BLMOVE); "
                "upgrade Redis"
            )
        self._checked_version = True

    def close(self) -> None:
        self.pools.close()

    # -- topology --------------------------------------------------------------------------------
    def declare(self, queues: Iterable[str]) -> None:
        """Lists need no declaring; this checks the names and that Redis is reachable."""
        for queue in queues:
            keys.check_queue(queue)
        self.connect()

    # -- producing -------------------------------------------------------------------------------
    def publish(self, queue: str, message: Message, *, eta: float | None = None) -> None:
        keys.check_queue(queue)
        try:
            payload = envelope.dumps(message, queue=queue)
        except (TypeError, ValueError) as exc:
            raise PublishError(
                f"message for queue {queue!r} cannot be written as kombu's JSON envelope: {exc}; "
                "headers and properties must hold JSON values only"
            ) from exc
        step = keys.step_for(message.properties.get("priority"), self.cfg.priority_steps)
        if eta is not None:
            if isinstance(eta, bool) or not isinstance(eta, int | float) or not math.isfinite(eta):
                raise PublishError(f"eta must be a finite number of epoch seconds, got {eta!r}")
            if eta > time.time():
                member = f"{step}:{payload}"
                args = [repr(float(eta)), member, keys.bell_channel(queue)]
                dkey = keys.delayed_key(queue)
                self._retry(
                    f"publishing a delayed message to {queue!r}",
                    lambda c: self.scripts.delay(keys=[dkey], args=args, client=c),
                    PublishError,
                )
                return
        target = keys.list_key(queue, step)
        self._retry(f"publishing to {queue!r}", lambda c: c.lpush(target, payload), PublishError)

    # -- consuming -------------------------------------------------------------------------------
    def consumer(self, queues: Sequence[str], prefetch: int) -> RedisConsumer:
        self._check_version()
        return RedisConsumer(self, queues, prefetch)

    # -- administration --------------------------------------------------------------------------
    def purge(self, queue: str) -> int:
        keys.check_queue(queue)
        names = keys.list_keys(queue, self.cfg.priority_steps)

        def op(c: redis.Redis) -> int:
            with c.pipeline(transaction=True) as pipe:
                for name in names:
                    pipe.llen(name)
                    pipe.delete(name)
                res = pipe.execute()
            return sum(int(n) for n in res[::2])

        return self._retry(f"purging {queue!r}", op, BrokerError)

    def queue_length(self, queue: str) -> int:
        keys.check_queue(queue)
        names = keys.list_keys(queue, self.cfg.priority_steps)

        def op(c: redis.Redis) -> int:
            with c.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.llen(name)
                return sum(int(n) for n in pipe.execute())

        return self._retry(f"counting {queue!r}", op, BrokerError)

    def delayed_count(self, queue: str) -> int:
        """Messages of `queue` waiting for their eta (held in Redis, not in any worker)."""
        dkey = keys.delayed_key(keys.check_queue(queue))
        return int(self._retry(f"counting delayed {queue!r}", lambda c: c.zcard(dkey), BrokerError))

    def dead_letters(self, queue: str, limit: int = 100) -> list[Message]:
        dead = keys.dead_key(keys.check_queue(queue))
        if limit <= 0:
            return []
        raws = self._retry(
            f"listing dead letters of {queue!r}", lambda c: c.lrange(dead, -limit, -1), BrokerError
        )
        out: list[Message] = []
        for raw in reversed(raws):  # the right end is the oldest
            try:
                out.append(envelope.loads(raw))
            except MalformedMessage as exc:
                log.warning("redis: skipping an unreadable entry of %r: %s", dead, exc)
        return out

    def replay_dead_letters(self, queue: str, limit: int | None = None) -> int:
        """Move dead letters back to the end of their queue, oldest first, without the death
        reason; entries that are not envelopes stay where they are."""
        dead = keys.dead_key(keys.check_queue(queue))
        moved = skipped = 0
        while limit is None or moved < limit:
            size = _REPLAY_BATCH if limit is None else min(_REPLAY_BATCH, limit - moved)
            window = (-(skipped + size), -(skipped + 1))
            raws: list[bytes] = self._retry(
                f"reading dead letters of {queue!r}",
                lambda c, w=window: c.lrange(dead, *w),  # type: ignore[misc]
                BrokerError,
            )
            if not raws:
                break
            args: list[Any] = []
            for raw in reversed(raws):
                try:
                    message = envelope.loads(raw)
                except MalformedMessage:
                    skipped += 1
                    continue
                message.headers.pop(DEATH_REASON, None)
                step = keys.step_for(message.properties.get("priority"), self.cfg.priority_steps)
                args += [raw, envelope.dumps(message, queue=queue), keys.list_key(queue, step)]
            if args:
                moved += int(
                    self._retry(
                        f"replaying dead letters of {queue!r}",
                        lambda c, a=args: self.scripts.replay(keys=[dead], args=a, client=c),  # type: ignore[misc]
                        BrokerError,
                    )
                )
            if len(raws) < size:
                break
        return moved

    def default_backend(self) -> RedisResultBackend:
        return RedisResultBackend(self.url, self.options)
