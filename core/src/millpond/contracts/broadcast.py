"""What a broker offers besides task queues: exchanges, for remote control and events.

Celery's control plane (kombu's pidbox) and its events (`celeryev`) publish to named exchanges
and listen on queues bound to them. A broker that can carry them sets `Broker.supports_broadcast`
and implements `Broker.broadcast` and `Broker.listen` in exactly the layout kombu uses on that
broker (each plugin's `broadcast` module describes it), so a Celery client and a millpond worker
(or the reverse) meet on the same wire.

Threading: `broadcast` is safe from any thread, like `publish`. A `Subscription` is used by the
one thread that opened it (`receive` then `close`); it owns its connection, so a listener never
competes with the consumer loop for one. A subscription survives a broker restart on its own: while
the broker is away `receive` returns nothing (after waiting its timeout) and reconnects, declaring
its queue and binding again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal, get_args

from millpond.wire.protocol import Message

ExchangeKind = Literal["fanout", "topic", "direct"]


@dataclass(frozen=True, slots=True)
class Exchange:
    """A named exchange. `durable`/`auto_delete` matter on RabbitMQ only, where they must equal
    what Celery declares (`celery.pidbox`: fanout, not durable; `reply.celery.pidbox`: direct,
    not durable; `celeryev`: topic, durable): a mismatch is a `PRECONDITION_FAILED`."""

    name: str
    kind: ExchangeKind = "fanout"
    durable: bool = False
    auto_delete: bool = False

    def __post_init__(self) -> None:
        if self.kind not in get_args(ExchangeKind):
            kinds = sorted(get_args(ExchangeKind))
            raise ValueError(f"exchange kind must be one of {kinds}, got {self.kind!r}")
        if not self.name:
            raise ValueError("an exchange needs a name (the default exchange carries task queues)")


@dataclass(frozen=True, slots=True)
class Listen:
    """A queue bound to an exchange, to listen on.

    `message_ttl` and `expires` (seconds) become `x-message-ttl` and `x-expires` on RabbitMQ; on
    Redis a direct-bound queue's list gets `expires` as its key TTL, refreshed while it is read,
    and pub/sub keeps nothing to expire.
    """

    queue: str
    exchange: Exchange
    routing_key: str = ""
    durable: bool = False
    exclusive: bool = False
    auto_delete: bool = True
    message_ttl: float | None = None
    expires: float | None = None

    def __post_init__(self) -> None:
        if not self.queue:
            raise ValueError("a listening queue needs a name")
        if self.durable and self.exclusive:
            raise ValueError("a queue cannot be both durable and exclusive")


@dataclass(slots=True)
class Received:
    """One broadcast message as it arrived: the message and where it was published."""

    message: Message
    exchange: str
    routing_key: str = ""


class Subscription(ABC):
    """A listening queue (or pub/sub subscription) with its own connection, used by one thread."""

    @abstractmethod
    def receive(self, timeout: float) -> list[Received]:
        """The messages that arrived, waiting at most `timeout` seconds for the first one.

        Never raises for a lost connection: it logs, reconnects on a later call and returns [].
        """

    @abstractmethod
    def close(self) -> None:
        """Stop listening; an auto-delete queue goes with it. Idempotent."""

    @property
    def connected(self) -> bool:
        """Whether the last receive reached the broker (cheap, never blocks)."""
        return True


def unavailable(broker: object) -> str:
    """What a worker says when its broker has no exchanges (the capability flag is off)."""
    return (
        f"remote control and events are not available on this broker ({broker}): it cannot "
        "carry broadcast messages. Use Redis (redis://), RabbitMQ (amqp://) or the embedded "
        "sqlite:// or memory:// broker for them"
    )
