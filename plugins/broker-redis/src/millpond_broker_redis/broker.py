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
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import redis
from redis.commands.core import Script

from millpond.contracts.broadcast import Exchange, Listen
from millpond.contracts.broker import Broker, Claims, Outbound, QueueStats
from millpond.exceptions import (
    AccessDenied,
    BrokerError,
    MalformedMessage,
    PublishAccessDenied,
    PublishError,
)
from millpond.wire import envelope
from millpond.wire.protocol import DEATH_REASON, Message
from millpond_broker_redis import broadcast as exchanges
from millpond_broker_redis import keys, scripts
from millpond_broker_redis.backend import RedisResultBackend
from millpond_broker_redis.config import RedisConfig, parse
from millpond_broker_redis.connection import (
    ACCESS_ERRORS,
    RETRYABLE,
    SCRIPT_ENCODER,
    Pools,
    access_problem,
    is_transient,
)
from millpond_broker_redis.consumer import RedisConsumer

log = logging.getLogger("millpond.broker.redis")

T = TypeVar("T")
#: the oldest server this plugin supports: RPOP with a count and BLMOVE arrived in Redis 6.2
MIN_REDIS = (6, 2)
_REPLAY_BATCH = 100


def _per_node(reply: Any) -> list[Mapping[str, Any]]:
    """A server-wide reply (INFO, CONFIG GET) as one mapping per node: a cluster client answers
    {node name: reply} when it asked every node, a plain client the reply itself."""
    if isinstance(reply, Mapping) and reply and all(isinstance(v, Mapping) for v in reply.values()):
        return list(reply.values())
    return [reply] if isinstance(reply, Mapping) else []


class Scripts:
    """The Lua scripts, registered once per broker; EVALSHA, reloaded after a server restart
    (each call names the client it runs on)."""

    def __init__(self) -> None:
        self.fetch = Script(SCRIPT_ENCODER, scripts.FETCH)
        self.requeue = Script(SCRIPT_ENCODER, scripts.REQUEUE)
        self.dead_letter = Script(SCRIPT_ENCODER, scripts.DEAD_LETTER)
        self.close = Script(SCRIPT_ENCODER, scripts.CLOSE)
        self.beat = Script(SCRIPT_ENCODER, scripts.BEAT)
        self.delay = Script(SCRIPT_ENCODER, scripts.DELAY)
        self.replay = Script(SCRIPT_ENCODER, scripts.REPLAY)
        self.serving = Script(SCRIPT_ENCODER, scripts.SERVING)
        self.stats = Script(SCRIPT_ENCODER, scripts.STATS)


class RedisBroker(Broker):
    system: ClassVar[str] = "redis"
    supports_delay: ClassVar[bool] = True
    #: kombu's virtual exchanges (pub/sub, binding sets): remote control and events
    supports_broadcast: ClassVar[bool] = True

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self.cfg: RedisConfig = parse(url, self.options)
        #: key names: kombu's, or hash-tagged per queue on Redis Cluster
        self.layout = keys.Layout(self.cfg.cluster)
        self.pools = Pools(self.cfg)
        self.scripts = Scripts()
        self._checked_version = False
        self._checked_persistence = False
        #: queues a consumer of this broker serves: their delays are released here, so they wait
        #: in Redis whatever `delays` says
        self.served: Counter[str] = Counter()
        #: delays=auto: queue -> (whether a millpond worker serves it, until when that is known)
        self._serving_seen: dict[str, tuple[bool, float]] = {}
        self._said_celery_style: set[str] = set()

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
            except ACCESS_ERRORS as exc:  # before RETRYABLE: WRONGPASS is a ConnectionError
                denied = PublishAccessDenied if issubclass(error, PublishError) else AccessDenied
                raise denied(access_problem(self.cfg, what, exc)) from exc
            except redis.RedisError as exc:
                if not is_transient(exc):
                    raise error(
                        f"{what} failed: Redis at {self.cfg.masked_url} said: {exc}"
                    ) from exc
                left = deadline - time.monotonic()
                if left <= 0 and not isinstance(exc, RETRYABLE):  # NOREPLICAS, MISCONF, BUSY
                    raise error(
                        f"{what} failed: Redis at {self.cfg.masked_url} kept refusing it for "
                        f"{self.cfg.publish_retry_timeout:g}s ({attempts} attempts; last reply "
                        f"{exc}). NOREPLICAS: fewer replicas are in sync than the server's "
                        "min-replicas-to-write asks for; MISCONF: it cannot persist; BUSY: a "
                        "script runs too long"
                    ) from exc
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

    def connect(self) -> None:
        self._retry("connecting", lambda c: c.ping(), BrokerError)
        self._check_version()

    def _check_version(self) -> None:
        if self._checked_version:
            return
        info = self._retry("reading the server version", lambda c: c.info("server"), BrokerError)
        # a cluster client answers per node ({node: info}): the oldest node counts
        texts = [str(i.get("redis_version", "0")) for i in _per_node(info)] or ["0"]
        versions = [(tuple(int(p) for p in t.split(".")[:2] if p.isdigit()), t) for t in texts]
        version, text = min(versions)
        if version < MIN_REDIS:
            raise BrokerError(
                f"Redis at {self.cfg.masked_url} is version {text}; millpond-broker-redis needs "
                f"{'.'.join(map(str, MIN_REDIS))} or newer (RPOP with a count, BLMOVE); "
                "upgrade Redis"
            )
        self._checked_version = True

    def close(self) -> None:
        self.pools.close()

    def claims(self) -> Claims:
        """`SET NX PX` leases and state hashes on this Redis (see `millpond_broker_redis.claims`)."""
        from millpond_broker_redis.claims import RedisClaims

        return RedisClaims(self.pools, self.cfg.masked_url)

    # -- topology --------------------------------------------------------------------------------
    def declare(self, queues: Iterable[str]) -> None:
        """Lists need no declaring; this checks the names and that Redis is reachable."""
        for queue in queues:
            self.layout.check(queue)
        self.connect()

    # -- producing -------------------------------------------------------------------------------
    def _encoded(self, queue: str, message: Message) -> tuple[str, int]:
        """The message as kombu's JSON envelope for `queue`, and its priority step."""
        self.layout.check(queue)
        try:
            payload = envelope.dumps(message, queue=queue)
        except (TypeError, ValueError) as exc:
            raise PublishError(
                f"message for queue {queue!r} cannot be written as kombu's JSON envelope: {exc}; "
                "headers and properties must hold JSON values only"
            ) from exc
        return payload, keys.step_for(message.properties.get("priority"), self.cfg.steps)

    def publish_many(self, batch: Sequence[Outbound]) -> None:
        """Messages due now go in one pipelined round trip; delayed ones each take the delay
        script, as `publish` sends them."""
        now: list[tuple[str, str]] = []
        for item in batch:
            if item.eta is not None:
                self.publish(item.queue, item.message, eta=item.eta)
                continue
            payload, step = self._encoded(item.queue, item.message)
            now.append((keys.list_key(self.layout.queue(item.queue), step), payload))
        if not now:
            return

        def op(c: redis.Redis) -> None:
            with c.pipeline(transaction=False) as pipe:
                for target, payload in now:
                    pipe.lpush(target, payload)
                pipe.execute()

        self._retry(f"publishing {len(now)} messages", op, PublishError)

    def publish(self, queue: str, message: Message, *, eta: float | None = None) -> None:
        payload, step = self._encoded(queue, message)
        if eta is not None:
            if isinstance(eta, bool) or not isinstance(eta, int | float) or not math.isfinite(eta):
                raise PublishError(f"eta must be a finite number of epoch seconds, got {eta!r}")
            if eta > time.time() and self._holds_delays(queue, message):
                member = f"{step}:{payload}"
                kq = self.layout.queue(queue)
                args = [repr(float(eta)), member, keys.bell_channel(kq)]
                dkey = keys.delayed_key(kq)
                self._retry(
                    f"publishing a delayed message to {queue!r}",
                    lambda c: self.scripts.delay(keys=[dkey], args=args, client=c),
                    PublishError,
                )
                return
        target = keys.list_key(self.layout.queue(queue), step)
        self._retry(f"publishing to {queue!r}", lambda c: c.lpush(target, payload), PublishError)

    def _holds_delays(self, queue: str, message: Message) -> bool:
        """Whether a delayed message for `queue` waits in Redis (released by a millpond worker)
        or goes out now with its eta in the headers, as Celery sends it (a Celery worker holds it
        until due; a millpond worker that gets it hands it back here). `auto` asks Redis, at most
        once a second per queue, whether a millpond worker serves the queue. A message whose
        headers carry no eta always waits here: sent now, it would run now."""
        mode = self.cfg.delays
        if mode == "broker" or queue in self.served or not message.headers.get("eta"):
            return True
        if mode == "celery":
            return False
        now = time.monotonic()
        seen = self._serving_seen.get(queue)
        if seen is None or seen[1] <= now:
            count = self._retry(
                f"checking who serves {queue!r}",
                lambda c: self.scripts.serving(
                    keys=[keys.serving_key(self.layout.queue(queue))], args=[""], client=c
                ),
                PublishError,
            )
            seen = (bool(count), now + 1.0)
            self._serving_seen[queue] = seen
        if not seen[0] and queue not in self._said_celery_style:
            self._said_celery_style.add(queue)
            log.info(
                "redis: no millpond worker serves queue %r now, so its delayed messages go out "
                "at once with their eta in the headers, as Celery sends them (set "
                "redis.delays=broker to hold them in Redis for millpond workers instead)",
                queue,
            )
        return seen[0]

    # -- exchanges -------------------------------------------------------------------------------
    def broadcast(
        self,
        exchange: Exchange,
        message: Message,
        routing_key: str = "",
        *,
        ttl: float | None = None,
    ) -> int:
        try:
            payload = envelope.dumps(message, queue=routing_key, exchange=exchange.name)
        except (TypeError, ValueError) as exc:
            raise PublishError(
                f"message for exchange {exchange.name!r} cannot be written as kombu's JSON "
                f"envelope: {exc}"
            ) from exc
        return exchanges.publish(self, exchange, payload, routing_key, ttl)

    def listen(self, spec: Listen) -> exchanges.RedisSubscription:
        return exchanges.RedisSubscription(self, spec)

    # -- consuming -------------------------------------------------------------------------------
    def consumer(self, queues: Sequence[str], prefetch: int) -> RedisConsumer:
        self._check_version()
        if self.cfg.warn_without_persistence:
            self._check_persistence()
        return RedisConsumer(self, queues, prefetch)

    def _check_persistence(self) -> None:
        """Warn once when the server keeps nothing across a restart (no AOF, no save points):
        every queued and delayed task would be lost with it, without a word otherwise."""
        if self._checked_persistence:
            return
        self._checked_persistence = True
        try:
            client = self.pools.client()
            aofs = [c.get("appendonly", "") for c in _per_node(client.config_get("appendonly"))]
            saves = [c.get("save", "") for c in _per_node(client.config_get("save"))]
        except redis.RedisError as exc:  # CONFIG is often disabled on managed Redis
            log.debug("redis: cannot read the server's persistence settings (%s)", exc)
            return
        if any(
            str(aof).lower() != "yes" and not str(save).strip()
            for aof, save in zip(aofs, saves, strict=False)
        ):
            log.warning(
                "redis: the server at %s keeps no append-only file and no snapshots "
                '(appendonly no, save ""): if it restarts, every queued and delayed task is '
                "lost. Turn on appendonly yes (docs/redis.md, Redis restarts and persistence) or set "
                "redis.warn_without_persistence = false where that is intended",
                self.cfg.masked_url,
            )

    # -- administration --------------------------------------------------------------------------
    def purge(self, queue: str) -> int:
        names = keys.list_keys(self.layout.queue(self.layout.check(queue)), self.cfg.steps)

        def op(c: redis.Redis) -> int:
            with c.pipeline(transaction=True) as pipe:
                for name in names:
                    pipe.llen(name)
                    pipe.delete(name)
                res = pipe.execute()
            return sum(int(n) for n in res[::2])

        return self._retry(f"purging {queue!r}", op, BrokerError)

    def queue_length(self, queue: str) -> int:
        names = keys.list_keys(self.layout.queue(self.layout.check(queue)), self.cfg.steps)

        def op(c: redis.Redis) -> int:
            with c.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.llen(name)
                return sum(int(n) for n in pipe.execute())

        return self._retry(f"counting {queue!r}", op, BrokerError)

    def queue_stats(self, queue: str) -> QueueStats:
        """Ready (all priority lists), delayed, reserved by consumers, and live millpond
        consumers of `queue`, in one script call. Celery workers' reservations are not counted
        (kombu keeps them in its own `unacked` hash, under no queue name)."""
        kq = self.layout.queue(self.layout.check(queue))
        stat_keys = [
            self.layout.consumers(queue),
            keys.serving_key(kq),
            keys.delayed_key(kq),
            *keys.list_keys(kq, self.cfg.steps),
        ]
        ready, delayed, reserved, consumers = self._retry(
            f"reading the stats of {queue!r}",
            lambda c: self.scripts.stats(keys=stat_keys, args=[kq], client=c),
            BrokerError,
        )
        return QueueStats(queue, int(ready), int(delayed), int(reserved), int(consumers))

    def delayed_count(self, queue: str) -> int:
        """Messages of `queue` waiting for their eta (held in Redis, not in any worker)."""
        dkey = keys.delayed_key(self.layout.queue(self.layout.check(queue)))
        return int(self._retry(f"counting delayed {queue!r}", lambda c: c.zcard(dkey), BrokerError))

    def dead_letters(self, queue: str, limit: int = 100) -> list[Message]:
        dead = keys.dead_key(self.layout.queue(self.layout.check(queue)))
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
        dead = keys.dead_key(self.layout.queue(self.layout.check(queue)))
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
                step = keys.step_for(message.properties.get("priority"), self.cfg.steps)
                target = keys.list_key(self.layout.queue(queue), step)
                args += [raw, envelope.dumps(message, queue=queue), target]
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
