"""The broker contract every transport plugin implements: publish, consume, acknowledge.

What a broker cannot do it says one way: the optional method raises `NotSupported`, naming the
broker and what to use instead (or a `supports_*` flag, which callers ask first, is False).

Threading (the contract, not advice): `Broker.publish`, `declare`, `purge` and the `ResultBackend`
methods are safe from any thread and after `os.fork()` (reconnect on a new pid), as tasks publish
from pool threads, greenlets and child processes. A `Consumer` belongs to the consumer loop's one
thread; it watches the `Waker` of the loop's `Inbox` while it blocks in `fetch`, so a completion's
ack never waits for the poll timeout, and keeps its own liveness (AMQP heartbeats, leases) while
that thread runs a task inline (solo): a helper thread with its own connection, or a lock.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from millpond.contracts.backend import ResultBackend
from millpond.contracts.broadcast import Exchange, Listen, Subscription, unavailable
from millpond.contracts.waking import Waker
from millpond.exceptions import NotSupported
from millpond.wire.protocol import Message

#: query parameters that carry a secret (`?sentinel_password=...`, `?token=...`)
_SECRET_QUERY = re.compile(
    r"((?:^|[&;])[^=&;]*(?:password|passwd|secret|token)[^=&;]*=)[^&;]*", re.I
)


def mask_url(url: str | None) -> str:
    """The URL with its password and secret query parameters replaced by `***` (banners, logs)."""
    if not url:
        return ""
    if ";" in url:  # a failover list (amqp://h1;amqp://h2, kombu's form): mask every member
        return ";".join(mask_url(part) for part in url.split(";"))
    parts = urlsplit(url)
    query = _SECRET_QUERY.sub(r"\1***", parts.query)
    # the netloc is rewritten as text, not re-assembled from hostname/port: multi-host netlocs
    # (redis+sentinel://:pw@h1:26379,h2:26379) have no single port, and IPv6 keeps its brackets
    userinfo, at, hosts = parts.netloc.rpartition("@")
    netloc = f"{userinfo.split(':', 1)[0]}:***@{hosts}" if at and ":" in userinfo else parts.netloc
    if query == parts.query and netloc == parts.netloc:
        return url  # untouched, not normalised by urlunsplit
    return urlunsplit(parts._replace(query=query, netloc=netloc))


def dead_letter_queue(queue: str) -> str:
    """The name of a queue's dead-letter destination; the same on every broker."""
    return f"{queue}.dead"


@dataclass(slots=True)
class Delivery:
    """One message handed to a consumer, not yet acknowledged. `delivery_count` is 1 at first and
    counts each redelivery (a requeue, the holder's death), else a lower bound (2 if redelivered)."""

    message: Message
    queue: str
    tag: Any
    redelivered: bool = False
    delivery_count: int = 1


@dataclass(frozen=True, slots=True)
class QueueStats:
    """What a broker can tell about a queue without consuming (`millpond queue-stats`, gauges);
    `None` where it cannot tell. `ready + reserved` (fetched, unacknowledged) is the backlog."""

    queue: str
    ready: int
    delayed: int | None = None
    reserved: int | None = None
    consumers: int | None = None


@dataclass(frozen=True, slots=True)
class Outbound:
    """One message of `Broker.publish_many`: the queue, the message, when it may run."""

    queue: str
    message: Message
    eta: float | None = None


class Consumer(ABC):
    """Receives messages from a set of queues for one worker; used from the consumer loop only."""

    @abstractmethod
    def fetch(self, max_count: int, timeout: float, waker: Waker | None = None) -> list[Delivery]:
        """1..max_count (never more: the prefetch limit) deliveries as soon as any is available,
        blocking at most `timeout` seconds, early (maybe empty) when `waker` is readable.
        `AccessDenied` stops the worker, saying why; anything else is logged and retried."""

    @abstractmethod
    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge finished deliveries (one round trip where the broker allows)."""

    @abstractmethod
    def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        """Give a delivery back to its queue (`requeue`, counting the delivery), else to
        `dead_letter_queue(queue)` with `reason` in the header `x-millpond-death-reason`."""

    @abstractmethod
    def close(self) -> None:
        """Stop consuming. Unacknowledged deliveries go back to their queues (cold shutdown)."""

    def release(self, deliveries: Sequence[Delivery]) -> None:
        """At a warm shutdown, give back the fetched, unstarted deliveries now, not when a lease
        lapses; only the running ones' acks follow, so a pushing broker (AMQP) stops its
        subscription here. Skip any the broker took back; one round trip where it can."""
        for delivery in deliveries:
            self.reject(delivery, requeue=True, reason="given back unstarted at a warm shutdown")

    def stale(self, delivery: Delivery) -> bool:
        """Whether another consumer may hold this buffered delivery by now (its lease lapsed, its
        channel closed), asked cheaply as it starts: yes requeues it, a wrong no runs it twice."""
        return False

    def resize(self, prefetch: int) -> bool:
        """Change the prefetch limit while consuming (by what rate-limited tasks hold waiting);
        False when this consumer cannot, and the limit stays."""
        return False

    @property
    def connected(self) -> bool:
        """Whether the broker answered the last attempt (False while reconnecting); read from any
        thread by the readiness probe (`/readyz`), so cheap and never blocking."""
        return True


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a claim, and for how many more seconds (as the claims store counts)."""

    owner: str
    remaining: float


class Claims(ABC):
    """Short-lived named locks and a string map per namespace, held by the app's own broker (Redis
    `SET NX PX`, a sqlite row) from any thread and after `os.fork()`: replicas of `millpond beat`
    agree on who publishes each tick and remember what was published. A claim is forgotten `ttl`
    seconds after its last successful `acquire`, whatever becomes of its holder (SIGKILLed, say).
    Saved state stays until overwritten, in no transaction with a claim: save it after its claim."""

    #: False where a claim ends with its holder's connection (RabbitMQ's exclusive queues), not
    #: at its ttl: callers need not keep claims that only fence against that holder
    outlives_holder: ClassVar[bool] = True

    @abstractmethod
    def acquire(self, key: str, owner: str, ttl: float) -> bool:
        """Atomically take `key` for `owner` for `ttl` seconds (when free or its holder's time ran
        out) or extend `owner`'s; whether `owner` holds it now (two owners never do). Raises
        `BrokerError` when the store cannot be reached (then assume nothing is held)."""

    @abstractmethod
    def release(self, key: str, owner: str) -> None:
        """Give `key` up if `owner` holds it (a no-op otherwise), so a successor need not wait."""

    @abstractmethod
    def holder(self, key: str) -> Holder | None: ...

    @abstractmethod
    def load_state(self, namespace: str) -> dict[str, str]:
        """Every field stored under `namespace` (empty when none)."""

    @abstractmethod
    def save_state(self, namespace: str, values: Mapping[str, str]) -> None:
        """Store these fields under `namespace`, keeping the others."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections this object opened itself (the broker's own are the broker's)."""


class Broker(ABC):
    """A message transport chosen by URL scheme through the `millpond.brokers` entry-point group."""

    #: a short name for span attributes (`messaging.system`): "redis", "rabbitmq", ...
    system: ClassVar[str] = "millpond"
    #: whether the broker holds a `publish(eta=...)` until due (False: the kit skips that test)
    supports_delay: ClassVar[bool] = True
    #: exchanges for remote control and events (`broadcast`, `listen`); see contracts.broadcast
    supports_broadcast: ClassVar[bool] = False
    #: whether a dead consumer's messages come back (False where a fetch deletes the message: the
    #: kit skips that test, and the broker refuses to consume unless told the loss is accepted)
    redelivers_lost_deliveries: ClassVar[bool] = True

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.options: Mapping[str, Any] = dict(options or {})

    def connect(self) -> None:  # noqa: B027 - optional hook
        """Open connections eagerly (otherwise the first call opens them); raise BrokerError."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def declare(self, queues: Iterable[str]) -> None:
        """Make sure the queues and their dead-letter destinations exist (idempotent)."""

    @abstractmethod
    def publish(self, queue: str, message: Message, *, eta: float | None = None) -> None:
        """Return once the broker has the message (publisher confirms), or raise `PublishError`
        after bounded retries. The broker holds it until `eta` (epoch seconds), never a worker."""

    def publish_many(self, batch: Sequence[Outbound]) -> None:
        """`publish` for several (a group, a chord's header; RabbitMQ confirms them together).
        Where known, `PublishError.not_sent` lists the task ids not taken: the rest were sent."""
        for item in batch:
            self.publish(item.queue, item.message, eta=item.eta)

    @abstractmethod
    def consumer(self, queues: Sequence[str], prefetch: int) -> Consumer:
        """A consumer over `queues` that never holds more than `prefetch` unacknowledged messages."""

    @abstractmethod
    def purge(self, queue: str) -> int:
        """Remove every ready message from a queue; return how many."""

    def queue_length(self, queue: str) -> int:
        """Ready messages in a queue (for autoscaling and tests)."""
        raise NotSupported(f"{type(self).__name__} cannot count a queue")

    def queue_stats(self, queue: str) -> QueueStats:
        """What it can tell of a queue, safe from any thread (metrics collectors call it)."""
        return QueueStats(queue, self.queue_length(queue))

    def dead_letters(self, queue: str, limit: int = 100) -> list[Message]:
        """Messages in the queue's dead-letter destination, oldest first."""
        raise NotSupported(f"{type(self).__name__} cannot list dead letters")

    def replay_dead_letters(self, queue: str, limit: int | None = None) -> int:
        """Move dead-lettered messages back to their queue; return how many."""
        raise NotSupported(f"{type(self).__name__} cannot replay dead letters")

    def broadcast(
        self,
        exchange: Exchange,
        message: Message,
        routing_key: str = "",
        *,
        ttl: float | None = None,
    ) -> int | None:
        """Publish to an exchange in kombu's layout (contracts.broadcast), from any thread; raises
        `PublishError`, nobody listening is fine. `ttl` seconds bound the wait (AMQP `expiration`,
        a Redis key TTL). How many listeners it reached where the broker learns that for free,
        else None: a caller awaits that many replies, so never undercount (none at 0)."""
        raise NotSupported(unavailable(self))

    def listen(self, spec: Listen) -> Subscription:
        """Declare and bind `spec`'s queue and start listening on it, on a connection of its
        own (for one thread). Raises `BrokerError` if the broker cannot be reached."""
        raise NotSupported(unavailable(self))

    def claims(self) -> Claims:
        """Leases and a little state held by this broker, for replicated schedulers."""
        raise NotSupported(
            f"{type(self).__name__} cannot hold claims (needed by `millpond beat`); use the "
            "redis://, amqp:// or the embedded sqlite:// broker"
        )

    def default_backend(self) -> ResultBackend | None:
        """The result backend to use when none is configured (the broker's own store), if any."""
        return None
