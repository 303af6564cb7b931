"""What a broker offers besides task queues: exchanges, for remote control and events.

Celery's control plane (kombu's pidbox) and events (`celeryev`) publish to named exchanges and
listen on queues bound to them. A broker that carries them sets `Broker.supports_broadcast` and
implements `broadcast` and `listen` in kombu's layout on that broker (each plugin's `broadcast`
module describes it), so Celery and millpond meet on the same wire.
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
    what Celery declares (`celery.pidbox` and `reply.celery.pidbox` are not durable, `celeryev`
    is), or it refuses with `PRECONDITION_FAILED`."""

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
    """A queue bound to an exchange, to listen on. `message_ttl` and `expires` (seconds) become
    `x-message-ttl` and `x-expires` on RabbitMQ; on Redis `expires` is a direct-bound queue's key
    TTL, refreshed while it is read (pub/sub keeps nothing to expire)."""

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
    """A listening queue (or pub/sub subscription) on a connection of its own, used by the thread
    that opened it: a listener never competes with the consumer loop."""

    @abstractmethod
    def receive(self, timeout: float) -> list[Received]:
        """The messages that arrived, waiting at most `timeout` seconds for the first one; for a
        lost connection it logs, returns [] and reconnects on a later call, never raises."""

    @abstractmethod
    def close(self) -> None:
        """Stop listening; an auto-delete queue goes with it. Idempotent."""


def unavailable(broker: object) -> str:
    """What a worker says when its broker has no exchanges (the capability flag is off)."""
    return (
        f"remote control and events are not available on this broker ({broker}): it cannot "
        "carry broadcast messages. Use Redis (redis://), RabbitMQ (amqp://) or the embedded "
        "sqlite:// or memory:// broker for them"
    )
