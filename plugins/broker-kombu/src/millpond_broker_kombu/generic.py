"""Any other kombu virtual transport (mongodb://, consul://, etcd://, Azure, Google Pub/Sub,
SQLAlchemy) behind the broker contract, with what those transports cannot do said out loud.
zookeeper:// is this broker plus millpond's in-flight layer (`millpond_broker_kombu.zookeeper`),
which gives a killed worker's messages back; the others have none yet.

These transports remove a message from the store when it is fetched (kombu keeps unacknowledged
messages in the consumer's memory and writes them back when the channel closes cleanly). So:

* a worker killed with messages in hand loses them: the worker refuses to consume unless the
  `allow_message_loss` setting says that is accepted (the broker declares
  `redelivers_lost_deliveries = False`, and the conformance kit skips that test);
* there are no broker-held delays: a publish with an eta in the future raises `PublishError`;
* a requeue or a clean shutdown writes the message back (to the queue's tail) with its delivery
  counted in the header `x-millpond-delivery-count`.

Messages are put and got by kombu's own channel, in its JSON envelope, so Celery workers on the
same transport read them and millpond reads theirs.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

from millpond.contracts.broker import Broker, Consumer, Delivery, dead_letter_queue, mask_url
from millpond.contracts.waking import Waker
from millpond.exceptions import ConfigurationError, PublishError
from millpond.wire.protocol import DEATH_REASON, DELIVERY_COUNT, Message
from millpond_broker_kombu.link import Link, release
from millpond_broker_kombu.polling import delivered, poll_fetch, take_in_turn
from millpond_broker_kombu.section import KOMBU

log = logging.getLogger("millpond.broker.kombu")

#: properties kombu's envelope carries that are kombu's bookkeeping, not the message's
_BOOKKEEPING = frozenset({"delivery_info", "delivery_tag", "body_encoding"})


def to_message(kombu_message: Any) -> Message:
    """A millpond message from one kombu got from a virtual channel."""
    props = {k: v for k, v in dict(kombu_message.properties).items() if k not in _BOOKKEEPING}
    body = kombu_message.body
    return Message(
        body=body if isinstance(body, bytes) else str(body).encode("utf-8"),
        headers=dict(kombu_message.headers or {}),
        content_type=kombu_message.content_type or "",
        content_encoding=kombu_message.content_encoding or "utf-8",
        properties=props,
    )


def _counted(message: Message, change: Mapping[str, Any]) -> Message:
    return Message(
        body=message.body,
        headers={**message.headers, **change},
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        properties=message.properties,
    )


class KombuBroker(Broker):
    """A kombu virtual transport chosen by the URL's scheme (kombu's own URL forms)."""

    system: ClassVar[str] = "kombu"
    supports_delay: ClassVar[bool] = False
    redelivers_lost_deliveries: ClassVar[bool] = False

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self.safe_url = mask_url(url)
        self.scheme = urlsplit(url).scheme
        # the URL's query belongs to kombu's transport (mongodb://...?authSource=admin)
        self.settings = KOMBU.resolve(self.options)
        self.link = Link(
            url,
            safe_url=self.safe_url,
            transport_options=self.settings["transport_options"],
            retry_timeout=float(self.settings["publish_retry_timeout"]),
        )

    def __repr__(self) -> str:
        return f"<KombuBroker {self.safe_url}>"

    def connect(self) -> None:
        self.link.run("connecting", lambda conn, _p: conn.ensure_connection(max_retries=1))

    def close(self) -> None:
        self.link.close()

    def declare(self, queues: Iterable[str]) -> None:
        for queue in queues:
            for name in (queue, dead_letter_queue(queue)):
                self._declare(name)

    def _declare(self, name: str) -> None:
        def declare(conn: Any, _p: Any) -> None:
            conn.default_channel.queue_declare(queue=name)

        self.link.run(f"declaring {name!r}", declare)

    def publish(self, queue: str, message: Message, *, eta: float | None = None) -> None:
        if eta is not None and eta > time.time() + 0.05:
            raise PublishError(
                f"{self.scheme}:// has no broker-held delays (kombu's transport cannot hold a "
                f"message until a time), so a countdown/eta for queue {queue!r} cannot be kept; "
                "send it without one, or use a broker that holds delays (sqs, filesystem, "
                "redis, amqp)"
            )
        self.link.publish(queue, message)

    def consumer(self, queues: Sequence[str], prefetch: int) -> Consumer:
        if not self.settings["allow_message_loss"]:
            raise ConfigurationError(
                f"{self.scheme}:// removes a message when a worker fetches it, so a worker killed "
                "with messages in hand loses them (kombu's transport has no lease or visibility "
                "timeout, and millpond has no in-flight layer for it yet). Set "
                "allow_message_loss = true in the [kombu] section "
                "(MILLPOND_KOMBU__ALLOW_MESSAGE_LOSS=true) to consume anyway, ideally with "
                "prefetch 1; or use a broker that gives messages back (zookeeper, sqs, "
                "filesystem, redis, amqp)"
            )
        log.warning(
            "%s:// holds no delays: a retry with a countdown, or a task sent with an eta, cannot "
            "be published and goes back to its queue until max_deliveries dead-letters it; a "
            "killed worker loses the messages it holds (allow_message_loss is on)",
            self.scheme,
        )
        return KombuConsumer(self, list(queues), prefetch)

    def purge(self, queue: str) -> int:
        return int(
            self.link.run(
                f"purging {queue!r}",
                lambda conn, _p: conn.default_channel.queue_purge(queue=queue) or 0,
            )
        )

    def queue_length(self, queue: str) -> int:
        ok = self.link.run(
            f"counting {queue!r}",
            lambda conn, _p: conn.default_channel.queue_declare(queue=queue, passive=True),
        )
        return int(ok.message_count)

    def _take(self, queue: str, limit: int | None) -> list[Message]:
        def take(conn: Any, _p: Any) -> list[Message]:
            out: list[Message] = []
            channel = conn.default_channel
            while limit is None or len(out) < limit:
                got = channel.basic_get(queue=queue, no_ack=True)
                if got is None:
                    break
                out.append(to_message(got))
            return out

        return self.link.run(f"reading {queue!r}", take)

    def dead_letters(self, queue: str, limit: int = 100) -> list[Message]:
        """Dead letters, oldest first: taken and written back at once (these transports cannot
        read a message without taking it)."""
        dead = dead_letter_queue(queue)
        taken = self._take(dead, limit)
        for message in taken:
            self.link.publish(dead, message)
        return taken

    def replay_dead_letters(self, queue: str, limit: int | None = None) -> int:
        taken = self._take(dead_letter_queue(queue), limit)
        for message in taken:
            message.headers.pop(DEATH_REASON, None)
            message.headers.pop(DELIVERY_COUNT, None)
            self.link.publish(queue, message)
        return len(taken)


class KombuConsumer(Consumer):
    """Polls its queues in turn on its own kombu channel (the consumer loop's thread only)."""

    def __init__(self, broker: KombuBroker, queues: list[str], prefetch: int) -> None:
        self.broker = broker
        self.queues = queues
        self.prefetch = max(1, prefetch)
        self.poll = float(broker.settings["polling_interval"])
        self.conn: Any = broker.link.new_connection()
        self.channel: Any = self.conn.default_channel
        self._held: dict[int, Delivery] = {}
        self._tags = itertools.count(1)
        self._turn = 0
        self._closed = False

    @property
    def connected(self) -> bool:
        return not self._closed

    def _take(self, queue: str) -> Delivery | None:
        got = self.channel.basic_get(queue=queue, no_ack=True)
        if got is None:
            return None
        message = to_message(got)
        delivery = delivered(message, queue, next(self._tags))
        self._held[delivery.tag] = delivery
        return delivery

    def _get(self, want: int) -> list[Delivery]:
        out, self._turn = take_in_turn(self.queues, self._turn, want, self._take)
        return out

    def fetch(self, max_count: int, timeout: float, waker: Waker | None = None) -> list[Delivery]:
        def look() -> list[Delivery]:
            return self._get(min(max_count, self.prefetch - len(self._held)))

        return poll_fetch(look, timeout, self.poll, waker, lambda: self._closed)

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            self._held.pop(d.tag, None)

    def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        self._held.pop(delivery.tag, None)
        if requeue:
            copy = _counted(delivery.message, {DELIVERY_COUNT: delivery.delivery_count + 1})
            self.broker.link.publish(delivery.queue, copy)
        else:
            copy = _counted(delivery.message, {DEATH_REASON: reason})
            self.broker.link.publish(dead_letter_queue(delivery.queue), copy)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        held, self._held = list(self._held.values()), {}
        for d in held:
            copy = _counted(d.message, {DELIVERY_COUNT: d.delivery_count + 1})
            try:
                self.broker.link.publish(d.queue, copy)
            except PublishError as exc:
                log.error("kombu: lost message %s at shutdown: %s", d.message.task_id, exc)
        release(self.conn)
