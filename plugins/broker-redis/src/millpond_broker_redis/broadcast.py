"""kombu's virtual exchanges on Redis: pub/sub for fanout and topic, a binding set for direct.

The layout (kombu's Redis transport with its defaults `fanout_prefix` and `fanout_patterns`):

* fanout / topic: PUBLISH kombu's JSON envelope on `/{db}.<exchange>`, or
  `/{db}.<exchange>/<routing key>` when the message has a routing key; a listener PSUBSCRIBEs the
  same name built from its binding key, with `#` turned into `*` (`celery.pidbox` uses no routing
  key; `celeryev` on Redis publishes `worker.heartbeat` and listeners bind `#`).
* direct: the set `_kombu.binding.<exchange>` holds `<routing key>\\x06\\x16<pattern>\\x06\\x16<queue>`
  for every bound queue; a publish LPUSHes the envelope onto the list of each queue whose routing
  key matches (the caller's reply queue `<oid>.reply.celery.pidbox`, bound with its oid).

Bounded where Celery is not: a direct publish with a `ttl` sets that TTL on the queue's list, so the
reply a caller never read (it timed out, it exited) is gone after `ttl` instead of staying forever.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Final

import redis
from redis.client import PubSub

from millpond.contracts.broadcast import Exchange, Listen, Received, Subscription
from millpond.exceptions import BrokerError, MalformedMessage, PublishError
from millpond.wire import envelope
from millpond_broker_redis import keys

if TYPE_CHECKING:
    from millpond_broker_redis.broker import RedisBroker

log = logging.getLogger("millpond.broker.redis")

BINDING_PREFIX: Final = "_kombu.binding."
#: the most messages one receive takes off a direct queue
_BATCH: Final = 100
_MAX_BACKOFF: Final = 5.0


def binding_table(exchange: str) -> str:
    return f"{BINDING_PREFIX}{exchange}"


def binding_member(routing_key: str, queue: str, pattern: str = "") -> str:
    return keys.SEP.join([routing_key, pattern, queue])


def parse_member(member: bytes | str) -> tuple[str, str, str]:
    text = member.decode("utf-8", "replace") if isinstance(member, bytes) else member
    parts = text.split(keys.SEP)
    if len(parts) != 3:
        return ("", "", "")
    return (parts[0], parts[1], parts[2])


def channel(db: int, exchange: str, routing_key: str = "") -> str:
    """The pub/sub channel kombu publishes an exchange's message on (or subscribes with)."""
    base = f"/{db}.{exchange}"
    return f"{base}/{routing_key}" if routing_key else base


def subscribe_pattern(db: int, exchange: str, binding_key: str) -> str:
    return channel(db, exchange, binding_key.replace("#", "*"))


def _split_channel(name: str) -> tuple[str, str]:
    """(exchange, routing key) of a channel `/{db}.<exchange>[/<routing key>]`."""
    if name.startswith("/"):
        name = name.partition(".")[2]
    exchange, _, routing_key = name.partition("/")
    return exchange, routing_key


def publish(
    broker: RedisBroker, exchange: Exchange, payload: str, routing_key: str, ttl: float | None
) -> int:
    """One broadcast, retried like every publish; how many listeners it reached (bound queues
    for direct, the subscribers PUBLISH reports for fanout and topic)."""
    if exchange.kind == "direct":
        table = binding_table(exchange.name)

        def direct(c: redis.Redis) -> int:
            targets = [
                queue
                for rk, _pattern, queue in map(parse_member, c.smembers(table))
                if queue and rk == routing_key
            ]
            if not targets:
                return 0
            with c.pipeline(transaction=False) as pipe:
                for queue in targets:
                    pipe.lpush(queue, payload)
                    if ttl:
                        pipe.pexpire(queue, max(1, round(ttl * 1000)))
                pipe.execute()
            return len(targets)

        return broker._retry(f"publishing to exchange {exchange.name!r}", direct, PublishError)
    name = channel(broker.cfg.db, exchange.name, routing_key)
    # a single server (or a sentinel's primary): PUBLISH counts every subscriber, patterns too
    return int(
        broker._retry(
            f"publishing to exchange {exchange.name!r}",
            lambda c: c.publish(name, payload),
            PublishError,
        )
    )


class RedisSubscription(Subscription):
    """A listener with its own connection: a pub/sub subscription or a bound list."""

    def __init__(self, broker: RedisBroker, spec: Listen) -> None:
        keys.check_queue(spec.queue)
        self.broker = broker
        self.spec = spec
        self._client: redis.Redis | None = None
        self._pubsub: PubSub | None = None
        self._closed = False
        self._ok = False
        self._backoff = 0.1
        self._retry_at = 0.0
        self._open()  # the first open raises: a listener that cannot start says so

    # -- the connection --------------------------------------------------------------------------
    def _open(self) -> None:
        spec = self.spec
        client = self.broker.pools.own_client()[0]
        try:
            if spec.exchange.kind == "direct":
                member = binding_member(spec.routing_key, spec.queue)
                client.sadd(binding_table(spec.exchange.name), member)
            else:
                pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.psubscribe(
                    subscribe_pattern(self.broker.cfg.db, spec.exchange.name, spec.routing_key)
                )
                # the subscription is in place once Redis confirms it
                deadline = time.monotonic() + max(1.0, self.broker.cfg.socket_timeout or 5.0)
                while not pubsub.subscribed and time.monotonic() < deadline:
                    pubsub.get_message(timeout=0.05)
                pubsub.ignore_subscribe_messages = True
                self._pubsub = pubsub
        except redis.RedisError as exc:
            client.close()
            raise BrokerError(
                f"cannot listen on exchange {spec.exchange.name!r} at Redis "
                f"{self.broker.cfg.masked_url}: {exc}"
            ) from exc
        self._client = client
        self._ok = True
        self._backoff = 0.1

    def _lost(self, exc: BaseException) -> None:
        if self._ok:
            log.warning(
                "redis: lost the listener on exchange %r (%s); reconnecting",
                self.spec.exchange.name,
                exc,
            )
        self._ok = False
        self._drop()
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, _MAX_BACKOFF)

    def _drop(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        client, self._client = self._client, None
        for thing in (pubsub, client):
            if thing is not None:
                try:
                    thing.close()
                except Exception:
                    log.debug("redis: closing a listener connection failed", exc_info=True)

    # -- receiving -------------------------------------------------------------------------------
    def receive(self, timeout: float) -> list[Received]:
        if self._closed:
            return []
        if self._client is None:
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, max(timeout, 0.0)))  # reconnect backoff, bounded by timeout
                return []
            try:
                self._open()
            except BrokerError as exc:
                self._lost(exc)
                return []
        try:
            if self._pubsub is not None:
                return self._receive_pubsub(timeout)
            return self._receive_list(timeout)
        except (redis.RedisError, OSError) as exc:  # RETRYABLE and the rest: reconnect
            self._lost(exc)
            return []

    def _receive_pubsub(self, timeout: float) -> list[Received]:
        pubsub = self._pubsub
        assert pubsub is not None
        out: list[Received] = []
        wait = timeout
        while len(out) < _BATCH:
            item = pubsub.get_message(timeout=wait)
            if item is None:
                break
            wait = 0.0
            if item.get("type") not in ("message", "pmessage"):
                continue
            name = item["channel"]
            name = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
            exchange, routing_key = _split_channel(name)
            got = self._decode(item["data"], exchange, routing_key)
            if got is not None:
                out.append(got)
        return out

    def _receive_list(self, timeout: float) -> list[Received]:
        client = self._client
        assert client is not None
        queue = self.spec.queue
        block = timeout
        limit = self.broker.cfg.socket_timeout
        if limit:
            block = min(block, max(0.05, limit / 2))
        raws: list[bytes | str] = []
        if block > 0:
            got = client.brpop([queue], timeout=block)
            if got is None:
                return []
            raws.append(got[1])
        more = client.rpop(queue, _BATCH - len(raws))
        if more:
            raws.extend(more if isinstance(more, list) else [more])
        out = []
        for raw in raws:
            received = self._decode(raw, self.spec.exchange.name, self.spec.routing_key)
            if received is not None:
                out.append(received)
        return out

    def _decode(self, raw: bytes | str, exchange: str, routing_key: str) -> Received | None:
        try:
            message = envelope.loads(raw)
        except MalformedMessage as exc:
            log.warning(
                "redis: dropped an unreadable message on exchange %r: %s",
                self.spec.exchange.name,
                exc,
            )
            return None
        return Received(message, exchange, routing_key)

    # -- closing ---------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        spec = self.spec
        if spec.exchange.kind == "direct" and spec.auto_delete and self._client is not None:
            try:
                with self._client.pipeline(transaction=False) as pipe:
                    pipe.srem(
                        binding_table(spec.exchange.name),
                        binding_member(spec.routing_key, spec.queue),
                    )
                    pipe.delete(spec.queue)
                    pipe.execute()
            except redis.RedisError as exc:
                log.debug("redis: could not remove the listener's queue %r: %s", spec.queue, exc)
        self._drop()
