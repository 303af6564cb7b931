"""What a broker offers besides task queues: exchanges, for remote control and events.

Celery's control plane (kombu's pidbox) and its events (`celeryev`) do not use task queues: they
publish to named exchanges and listen on queues bound to them. A broker that can carry them sets
`Broker.supports_broadcast` and implements `Broker.broadcast` and `Broker.listen` with exactly
the layout kombu uses on that broker, so a Celery client and a millpond worker (or the reverse)
meet on the same wire:

* RabbitMQ: real exchanges and queues, declared with the arguments Celery declares them with
  (a mismatch is a `PRECONDITION_FAILED` for whoever comes second).
* Redis: kombu's virtual exchanges. `fanout` and `topic` are PUBLISH on the channel
  `/{db}.<exchange>` (`/{db}.<exchange>/<routing key>` when there is a routing key) and
  PSUBSCRIBE on the same name, with a binding key's `#` turned into `*` (kombu's
  `fanout_patterns`; Celery declares `celeryev` as a fanout on Redis for this reason). `direct`
  looks the routing key up in the set `_kombu.binding.<exchange>` (members
  `<routing key>\\x06\\x16<pattern>\\x06\\x16<queue>`) and LPUSHes kombu's JSON envelope onto each
  bound queue's list.
* The embedded brokers: the same semantics in memory (one process) or in the SQLite file (one
  machine), through `Router`.

Threading: `broadcast` is safe from any thread, like `publish`. A `Subscription` is used by the
one thread that opened it (`receive` then `close`); it owns its connection, so a listener never
competes with the consumer loop for one. A subscription survives a broker restart on its own: while
the broker is away `receive` returns nothing (after waiting its timeout) and reconnects, declaring
its queue and binding again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Final, Literal

from millpond.wire.protocol import Message

ExchangeKind = Literal["fanout", "topic", "direct"]
KINDS: Final[frozenset[str]] = frozenset({"fanout", "topic", "direct"})

#: what a worker says when its broker has no exchanges (the capability flag is off)
UNAVAILABLE: Final = (
    "remote control and events are not available on this broker ({broker}): it cannot carry "
    "broadcast messages. Use Redis (redis://), RabbitMQ (amqp://) or the embedded sqlite:// or "
    "memory:// broker for them"
)


@dataclass(frozen=True, slots=True)
class Exchange:
    """A named exchange. `durable`/`auto_delete` matter on RabbitMQ only, where they must equal
    what Celery declares (`celery.pidbox`: fanout, not durable; `reply.celery.pidbox`: direct,
    not durable; `celeryev`: topic, durable)."""

    name: str
    kind: ExchangeKind = "fanout"
    durable: bool = False
    auto_delete: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"exchange kind must be one of {sorted(KINDS)}, got {self.kind!r}")
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
    #: when the broker handed it over (monotonic seconds), for latency accounting
    received_at: float = field(default=0.0, compare=False)


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

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- routing, for brokers that route themselves (the embedded ones) ----------------------------


def _topic_match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    """AMQP topic matching: words split on `.`, `*` is one word, `#` is zero or more."""
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_topic_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head in ("*", words[0])) and _topic_match(rest, words[1:])


def routes_to(kind: ExchangeKind, binding_key: str, routing_key: str) -> bool:
    """Whether a message published with `routing_key` reaches a queue bound with `binding_key`,
    by AMQP's rules for the exchange kind."""
    if kind == "fanout":
        return True
    if kind == "direct":
        return binding_key == routing_key
    return _topic_match(tuple(binding_key.split(".")), tuple(routing_key.split(".")))


def unavailable(broker: object) -> str:
    """The message for a broker without exchanges."""
    return UNAVAILABLE.format(broker=broker)
