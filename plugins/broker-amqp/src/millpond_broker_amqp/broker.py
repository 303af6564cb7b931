"""`AmqpBroker`: millpond's `Broker` contract on RabbitMQ (AMQP 0-9-1).

Publishing goes to the default exchange with the queue name as routing key, which is what Celery 5
does for its direct-exchange queues, with publisher confirms and `mandatory` set, so a message that
reaches no queue is an error rather than silently dropped. Queues are declared the way Celery
declares them (see `topology`), on first publish to them as well, so a Celery producer and a
millpond worker (or the reverse) share queues without any setup.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import amqp
from amqp import exceptions as amqp_exc

from millpond.contracts.backend import ResultBackend
from millpond.contracts.broadcast import Exchange, Listen
from millpond.contracts.broker import Broker, Claims, Outbound, QueueStats, dead_letter_queue
from millpond.exceptions import PublishError
from millpond.wire.protocol import DEATH_REASON, DELIVERY_COUNT, Message
from millpond_broker_amqp import broadcast as exchanges
from millpond_broker_amqp import native_delay
from millpond_broker_amqp.codec import from_properties, republish_headers, to_amqp
from millpond_broker_amqp.consumer import AmqpConsumer
from millpond_broker_amqp.link import Link, Outgoing
from millpond_broker_amqp.native_delay import declare_topology as declare_native_topology
from millpond_broker_amqp.settings import AmqpConfig, parse
from millpond_broker_amqp.topology import (
    DELAY_ETA,
    DELAY_TARGET,
    check_queue_name,
    declare_levels,
    declare_queue,
    delay_route,
    level_name,
)

_REPLAY_BATCH = 100


class AmqpBroker(Broker):
    """RabbitMQ broker: `amqp://user:pass@host:5672/vhost?option=value` (see docs/rabbitmq.md)."""

    system: ClassVar[str] = "rabbitmq"
    supports_delay: ClassVar[bool] = True
    #: real exchanges: remote control (pidbox) and events (celeryev)
    supports_broadcast: ClassVar[bool] = True

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self.settings: AmqpConfig = parse(url, self.options)
        self._link = Link(self.settings)
        # what this process declared on the link's current connection (reset on reconnect)
        self._declared: set[str] = set()
        self._levels = -1
        #: whether Celery's native delayed-delivery topology was declared on this connection
        self._native = False
        self._declared_on = -1

    def __repr__(self) -> str:
        return f"AmqpBroker({self.settings.safe_url!r})"

    # -- lifecycle -------------------------------------------------------------------------------
    def connect(self) -> None:
        self._link.call("connect", lambda chan: None)

    def close(self) -> None:
        self._link.close()

    def claims(self) -> Claims:
        """Exclusive queues as claims and a last-value queue as state, on a connection of their
        own (see `millpond_broker_amqp.claims`)."""
        from millpond_broker_amqp.claims import AmqpClaims

        return AmqpClaims(self.settings)

    # -- topology --------------------------------------------------------------------------------
    def declare(self, queues: Iterable[str]) -> None:
        names = list(dict.fromkeys(queues))
        for name in names:
            check_queue_name(name)

        def run(chan: amqp.Channel) -> None:
            self._sync_cache()
            for name in names:
                declare_queue(chan, name, self.settings)
                self._declared.add(name)

        self._link.call(f"declare {names}", run)

    def _sync_cache(self) -> None:
        """Forget declarations made on an earlier connection (the link's lock is held)."""
        if self._declared_on != self._link.generation:
            self._declared.clear()
            self._levels = -1
            self._native = False
            self._declared_on = self._link.generation

    # -- producing -------------------------------------------------------------------------------
    def publish(self, queue: str, message: Message, *, eta: float | None = None) -> None:
        item = self._outgoing(Outbound(queue, message, eta))
        self._link.publish(
            item.message,
            exchange=item.exchange,
            routing_key=item.routing_key,
            describe_target=item.target,
            before=item.before,
        )

    def publish_many(self, batch: Sequence[Outbound]) -> None:
        """Every message published, then their confirms awaited together (one round trip);
        what the broker nacks is sent again (see `Link.publish_batch`)."""
        if len(batch) < 2:
            for item in batch:
                self.publish(item.queue, item.message, eta=item.eta)
            return
        outgoing = [self._outgoing(item) for item in batch]
        self._link.publish_batch(outgoing)

    def _outgoing(self, item: Outbound) -> Outgoing:
        """Where one message goes: straight to its queue, or, with an eta ahead, into the delay
        topology (Celery's native delayed delivery on quorum queues, millpond's ladder else)."""
        queue, message, eta = item.queue, item.message, item.eta
        check_queue_name(queue, PublishError)
        if not isinstance(message, Message):
            raise TypeError(f"publish() takes a millpond Message, got {type(message).__name__}")
        target = f"queue {queue!r}"
        task_id = message.task_id if isinstance(message.task_id, str) else None
        delay = eta - time.time() if eta is not None else None
        if delay is not None and self.settings.quorum:
            key = native_delay.routing_key(delay, queue)
            if key is not None:
                before = self._before(queue, -1, native=True)
                msg = to_amqp(message)
                return Outgoing(msg, native_delay.ENTRY_EXCHANGE, key, target, before, task_id)
            delay = None
        route = delay_route(delay) if delay is not None else None
        if route is None:
            msg, exchange, key, top = to_amqp(message), "", queue, -1
        else:
            top, key = route
            headers = {**message.headers, DELAY_TARGET: queue, DELAY_ETA: float(eta or 0)}
            msg, exchange = to_amqp(message, headers), level_name(top)
        return Outgoing(msg, exchange, key, target, self._before(queue, top), task_id)

    def _publish_copy(
        self, queue: str, message: Message, headers: dict[str, Any], *, declare: bool = True
    ) -> None:
        """Publish a copy of a delivered message with new headers (requeue, dead-letter; a
        dead-letter queue is not declared as a work queue of its own)."""
        self._send(queue, to_amqp(message, headers), "", queue, top=-1, declare=declare)

    def _send(
        self,
        queue: str,
        msg: amqp.Message,
        exchange: str,
        key: str,
        *,
        top: int,
        declare: bool = True,
    ) -> None:
        target = f"queue {queue!r}"
        self._link.publish(
            msg,
            exchange=exchange,
            routing_key=key,
            describe_target=target,
            before=self._before(queue, top, declare=declare),
        )

    def _before(
        self, queue: str, top: int, *, declare: bool = True, native: bool = False
    ) -> Callable[[amqp.Channel], None]:
        """What to declare before publishing to `queue` (at delay level `top`, or through
        Celery's native delayed delivery), on each attempt: a new connection has declared
        nothing yet."""

        def before(chan: amqp.Channel) -> None:
            self._sync_cache()
            if declare and self.settings.declare_on_publish and queue not in self._declared:
                declare_queue(chan, queue, self.settings)
                self._declared.add(queue)
            if top > self._levels:
                declare_levels(chan, top)
                self._levels = top
            if native and not self._native:
                declare_native_topology(chan, self.settings.queue_type)
                self._native = True

        return before

    # -- exchanges -------------------------------------------------------------------------------
    def broadcast(
        self,
        exchange: Exchange,
        message: Message,
        routing_key: str = "",
        *,
        ttl: float | None = None,
    ) -> None:
        properties = dict(message.properties)
        if ttl is not None:
            properties["expiration"] = str(max(1, round(ttl * 1000)))
        msg = to_amqp(
            Message(
                message.body,
                message.headers,
                message.content_type,
                message.content_encoding,
                properties,
            )
        )
        exchanges.publish(self, exchange, msg, routing_key)

    def listen(self, spec: Listen) -> exchanges.AmqpSubscription:
        return exchanges.AmqpSubscription(self.settings, spec)

    # -- consuming -------------------------------------------------------------------------------
    def consumer(self, queues: Sequence[str], prefetch: int) -> AmqpConsumer:
        return AmqpConsumer(self, queues, prefetch)

    # -- administration --------------------------------------------------------------------------
    def purge(self, queue: str) -> int:
        check_queue_name(queue)

        def run(chan: amqp.Channel) -> int:
            with scratch_channel(chan) as scratch:
                try:
                    return int(scratch.queue_purge(queue) or 0)
                except amqp_exc.NotFound:
                    return 0

        return self._link.call(f"purge {queue!r}", run)

    def queue_length(self, queue: str) -> int:
        check_queue_name(queue)

        def run(chan: amqp.Channel) -> int:
            with scratch_channel(chan) as scratch:
                return _ready_count(scratch, queue)

        return self._link.call(f"count {queue!r}", run)

    def queue_stats(self, queue: str) -> QueueStats:
        """Ready messages and consumers, from a passive declare. RabbitMQ tells unacknowledged
        counts only through its management API, so `reserved` stays unknown (None) here: the
        workers' own gauges (`millpond.queue.reserved`, `.running`) carry that part."""
        check_queue_name(queue)

        def run(chan: amqp.Channel) -> QueueStats:
            with scratch_channel(chan) as scratch:
                try:
                    ok = scratch.queue_declare(queue, passive=True)
                except amqp_exc.NotFound:
                    return QueueStats(queue, 0, consumers=0)
                return QueueStats(queue, int(ok.message_count), consumers=int(ok.consumer_count))

        return self._link.call(f"stats of {queue!r}", run)

    def dead_letters(self, queue: str, limit: int = 100) -> list[Message]:
        """Peek: basic.get without ack on a scratch channel, whose close puts them all back
        where they were."""
        check_queue_name(queue)
        dead = dead_letter_queue(queue)

        def run(chan: amqp.Channel) -> list[Message]:
            out: list[Message] = []
            with scratch_channel(chan) as scratch:
                try:
                    before = _ready_count(scratch, dead)
                    while len(out) < limit:
                        got = scratch.basic_get(dead, no_ack=False)
                        if got is None:
                            break
                        out.append(from_properties(got.properties, _body(got)))
                except amqp_exc.NotFound:
                    return []
            if out:
                _wait_until_back(chan, dead, before)
            return out

        return self._link.call(f"read the dead letters of {queue!r}", run)

    def replay_dead_letters(self, queue: str, limit: int | None = None) -> int:
        """Move dead letters back to their queue, oldest first, in batches: each one is
        published (confirmed) before it is acked, so a failure duplicates and never loses.
        Without a limit it moves as many as the dead-letter queue held when it started."""
        check_queue_name(queue)
        dead = dead_letter_queue(queue)

        def count(chan: amqp.Channel) -> int:
            with scratch_channel(chan) as scratch:
                return _ready_count(scratch, dead)

        left = self._link.call(f"count {dead!r}", count) if limit is None else limit
        moved = 0
        while left > 0:
            want = min(left, _REPLAY_BATCH)
            done = self._link.call(
                f"replay the dead letters of {queue!r}",
                functools.partial(self._replay, queue=queue, want=want),
            )
            moved += done
            left -= done
            if done < want:
                break
        return moved

    def _replay(self, chan: amqp.Channel, *, queue: str, want: int) -> int:
        self._sync_cache()
        if queue not in self._declared:
            declare_queue(chan, queue, self.settings)
            self._declared.add(queue)
        done = 0
        with scratch_channel(chan) as scratch:
            try:
                for _ in range(want):
                    got = scratch.basic_get(dead_letter_queue(queue), no_ack=False)
                    if got is None:
                        break
                    message = from_properties(got.properties, _body(got))
                    headers = republish_headers(message, {DEATH_REASON: None, DELIVERY_COUNT: None})
                    copy = to_amqp(message, headers)
                    self._link.publish_on(chan, copy, "", queue, f"queue {queue!r}")
                    scratch.basic_ack(got.delivery_tag)
                    done += 1
            except amqp_exc.NotFound:
                pass
        return done

    def default_backend(self) -> ResultBackend | None:
        """None: configure a result backend (redis://, sqlite://) next to a RabbitMQ broker."""
        return None


@contextmanager
def scratch_channel(chan: amqp.Channel) -> Iterator[amqp.Channel]:
    """A short-lived channel beside the confirm channel, for calls that may fail with a channel
    error (a missing queue) or that leave messages unacked until it closes."""
    scratch = chan.connection.channel()
    scratch.auto_decode = False
    try:
        yield scratch
    finally:
        if scratch.is_open:
            scratch.close()


def _wait_until_back(chan: amqp.Channel, queue: str, count: int, within: float = 2.0) -> None:
    """RabbitMQ returns a closed channel's unacked messages asynchronously (a quorum queue
    takes a raft round); wait, bounded, until they are ready again, so that a replay or a
    consumer right after a peek finds them."""
    deadline = time.monotonic() + within
    with scratch_channel(chan) as scratch:
        while _ready_count(scratch, queue) < count and time.monotonic() < deadline:
            time.sleep(0.001)  # polling the server's count, with a deadline


def _ready_count(chan: amqp.Channel, queue: str) -> int:
    try:
        return int(chan.queue_declare(queue, passive=True).message_count)
    except amqp_exc.NotFound:
        return 0


def _body(msg: amqp.Message) -> bytes:
    body = msg.body
    return body if isinstance(body, bytes) else bytes(body, "utf-8")
