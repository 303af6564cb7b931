"""The broker contract every transport plugin implements: publish, consume, acknowledge.

Threading rules (they are the contract, not advice):

* `Broker.publish`, `Broker.declare`, `Broker.purge` and the `ResultBackend` methods are safe to call
  from any thread, and after `os.fork()` (an implementation reconnects when it sees a new pid). Task
  code publishes through them (nested `.delay()`), from pool threads, greenlets and child processes.
* A `Consumer` belongs to the worker's consumer loop: `fetch`, `ack`, `reject` and `close` are only
  ever called from that one thread. Completions from the pool reach the loop through an `Inbox`,
  whose `Waker` the consumer must watch while it blocks in `fetch`, so an ack is never held back
  until the next poll timeout.
* A consumer keeps its own liveness (AMQP heartbeats, Redis and embedded-broker leases) even while the
  loop thread is busy running a task inline (the solo pool): use a helper thread with its own
  connection, or a lock around the shared one.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from millpond.contracts.backend import ResultBackend
from millpond.contracts.broadcast import Exchange, Listen, Subscription, unavailable
from millpond.contracts.claims import Claims
from millpond.contracts.waking import Waker
from millpond.exceptions import NotSupported
from millpond.wire.protocol import Message

#: query parameters that carry a secret (`?sentinel_password=...`, `?token=...`)
_SECRET_QUERY = re.compile(
    r"((?:^|[&;])[^=&;]*(?:password|passwd|secret|token)[^=&;]*=)[^&;]*", re.I
)


def mask_url(url: str | None) -> str:
    """The URL with its password (and secret query parameters) replaced by `***`, for banners
    and logs."""
    if not url:
        return ""
    if ";" in url:  # a failover list (amqp://h1;amqp://h2, kombu's form): mask every member
        return ";".join(mask_url(part) for part in url.split(";"))
    parts = urlsplit(url)
    query = _SECRET_QUERY.sub(r"\1***", parts.query)
    if query != parts.query:
        parts = parts._replace(query=query)
        url = urlunsplit(parts)
    # the netloc is rewritten as text, not re-assembled from hostname/port: multi-host netlocs
    # (redis+sentinel://:pw@h1:26379,h2:26379) have no single port, and IPv6 keeps its brackets
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))


#: the reason a delivery given back unstarted carries (`Consumer.release`)
GIVEN_BACK = "given back unstarted at a warm shutdown"


def dead_letter_queue(queue: str) -> str:
    """The name of the dead-letter destination of a queue; the same on every broker."""
    return f"{queue}.dead"


@dataclass(slots=True)
class Delivery:
    """One message handed to a consumer, not yet acknowledged.

    `delivery_count` is 1 on the first delivery and counts every later one (after a requeue, or after
    the consumer holding it died). A broker that cannot count exactly gives its best lower bound (at
    least 2 when it knows the message was redelivered).
    """

    message: Message
    queue: str
    tag: Any
    redelivered: bool = False
    delivery_count: int = 1


@dataclass(frozen=True, slots=True)
class QueueStats:
    """What a broker can tell about one queue without consuming from it (`millpond queue-stats`,
    the autoscaling gauges). `None` means this broker cannot tell, never zero.

    `reserved` counts messages consumers hold (fetched, unacknowledged: waiting in a worker's
    buffer or running); `ready + reserved` is the queue's whole backlog.
    """

    queue: str
    ready: int
    delayed: int | None = None
    reserved: int | None = None
    consumers: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "ready": self.ready,
            "delayed": self.delayed,
            "reserved": self.reserved,
            "consumers": self.consumers,
        }


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
        """Return 1..max_count deliveries as soon as any is available.

        Block at most `timeout` seconds; return early (possibly empty) when `waker` becomes readable.
        Never return more than `max_count`: that is how the prefetch limit is kept. Raise
        `AccessDenied` when the broker refuses the credentials or a permission: the worker stops
        on it, saying why; anything else a fetch raises is logged and retried.
        """

    @abstractmethod
    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge finished deliveries (batched: one round trip where the broker allows)."""

    @abstractmethod
    def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        """Give a delivery back: to its queue (`requeue`, counting the delivery) or to the
        dead-letter destination `dead_letter_queue(queue)` with `reason` in the header
        `x-millpond-death-reason`."""

    @abstractmethod
    def close(self) -> None:
        """Stop consuming. Unacknowledged deliveries go back to their queues (cold shutdown)."""

    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Give back, at once, deliveries this consumer fetched but the worker never started
        (its prefetch buffer, at a warm shutdown): another consumer may fetch them right away,
        not after a lease or visibility timeout lapses, and while this consumer keeps holding
        (and later acknowledging) the deliveries that are still running.

        The worker fetches nothing more after a release: it only acknowledges what it still
        runs, then closes; a broker that pushes messages (AMQP) stops its subscription here so
        that the slots given back are not filled again. By default each delivery goes back with
        `reject(requeue=True)`, which every broker does immediately (counting the delivery); a
        broker that can give back a batch in one round trip may override this. A delivery the
        broker already took back (a lapsed lease) is skipped without error.
        """
        for delivery in deliveries:
            self.reject(delivery, requeue=True, reason=GIVEN_BACK)

    def stale(self, delivery: Delivery) -> bool:
        """Whether the broker may have given this delivery to another consumer since it was
        fetched (a lapsed lease, a closed channel): the worker then never starts it, and gives it
        back instead (`reject(requeue=True)`, harmless when the broker took it back already).

        Asked just before a buffered delivery starts, from the consumer loop; must be cheap and
        must not block. Say True only when it is certain or nearly (a consumer that stalled, for
        example under SIGSTOP, past its lease): a False negative runs a task twice, a false
        positive only sends it round the queue again. A consumer that cannot tell keeps this
        default.
        """
        return False

    def resize(self, prefetch: int) -> bool:
        """Change the prefetch limit of a running consumer (the worker widens it by the room its
        rate-limited tasks' waiting messages take). Returns False when this consumer cannot, and
        then the limit stays as it was."""
        return False

    @property
    def connected(self) -> bool:
        """Whether the broker answered the consumer's last attempt (False while reconnecting).

        Read from any thread by the readiness probe (`/readyz`); must be cheap and never block.
        A consumer that cannot tell keeps this default.
        """
        return True

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Broker(ABC):
    """A message transport chosen by URL scheme through the `millpond.brokers` entry-point group."""

    #: URL schemes this class serves (documentation; the entry points are what is used).
    schemes: ClassVar[tuple[str, ...]] = ()
    #: a short name for span attributes (`messaging.system`): "redis", "rabbitmq", ...
    system: ClassVar[str] = "millpond"
    #: what it can do, for the conformance kit and for capability checks
    supports_delay: ClassVar[bool] = True
    supports_priority: ClassVar[bool] = False
    #: exchanges for remote control and events (`broadcast`, `listen`); see contracts.broadcast
    supports_broadcast: ClassVar[bool] = False
    #: whether messages held by a consumer that dies without closing (SIGKILL, a lost machine)
    #: come back to their queue; False for transports that delete a message when it is fetched
    #: (the kit then skips its killed-consumer test, and such a broker should refuse to consume
    #: unless told the loss is accepted)
    redelivers_lost_deliveries: ClassVar[bool] = True

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.options: Mapping[str, Any] = dict(options or {})
        self._pid = os.getpid()

    # -- lifecycle -------------------------------------------------------------------------------
    def connect(self) -> None:  # noqa: B027 - optional hook
        """Open connections eagerly (otherwise the first call opens them); raise BrokerError."""

    @abstractmethod
    def close(self) -> None: ...

    # -- topology --------------------------------------------------------------------------------
    @abstractmethod
    def declare(self, queues: Iterable[str]) -> None:
        """Make sure the queues and their dead-letter destinations exist (idempotent)."""

    # -- producing -------------------------------------------------------------------------------
    @abstractmethod
    def publish(self, queue: str, message: Message, *, eta: float | None = None) -> None:
        """Hand a message to the broker; returns once the broker has it (publisher confirms).

        `eta` (seconds since the epoch) asks the broker to hold the message until then: delays live
        in the broker, never in a worker's memory. Raises `PublishError` when, after bounded
        retries, the broker did not take the message.
        """

    def publish_many(self, batch: Sequence[Outbound]) -> None:
        """Publish several messages, returning once the broker has them all (a group's tasks, a
        chord's header). Raises `PublishError` when, after bounded retries, any was not taken;
        the others may have been: a broker that knows which were not sets the error's
        `not_sent` to their task ids, so the rest are reported as sent.

        By default one `publish` after another; a broker whose confirms cost a round trip each
        (RabbitMQ) sends them all and then waits for their confirms together.
        """
        for item in batch:
            self.publish(item.queue, item.message, eta=item.eta)

    # -- consuming -------------------------------------------------------------------------------
    @abstractmethod
    def consumer(self, queues: Sequence[str], prefetch: int) -> Consumer:
        """A consumer over `queues` that never holds more than `prefetch` unacknowledged messages."""

    # -- administration --------------------------------------------------------------------------
    @abstractmethod
    def purge(self, queue: str) -> int:
        """Remove every ready message from a queue; return how many."""

    def queue_length(self, queue: str) -> int:
        """Ready messages in a queue (for autoscaling and tests); optional."""
        raise NotImplementedError(f"{type(self).__name__} cannot count a queue")

    def queue_stats(self, queue: str) -> QueueStats:
        """Ready, delayed and reserved counts and consumers of a queue, as far as this broker
        can tell (safe from any thread: metrics collectors call it); by default the ready count
        only."""
        return QueueStats(queue, self.queue_length(queue))

    def dead_letters(self, queue: str, limit: int = 100) -> list[Message]:
        """Messages in the queue's dead-letter destination, oldest first; optional."""
        raise NotImplementedError(f"{type(self).__name__} cannot list dead letters")

    def replay_dead_letters(self, queue: str, limit: int | None = None) -> int:
        """Move dead-lettered messages back to their queue; return how many; optional."""
        raise NotImplementedError(f"{type(self).__name__} cannot replay dead letters")

    # -- exchanges (remote control, events) -------------------------------------------------------
    def broadcast(
        self,
        exchange: Exchange,
        message: Message,
        routing_key: str = "",
        *,
        ttl: float | None = None,
    ) -> int | None:
        """Publish to an exchange in kombu's layout for this broker (see contracts.broadcast).

        Nobody listening is not an error (a fanout with no nodes, a reply whose caller left).
        `ttl` (seconds) bounds how long the message may wait: AMQP's `expiration`, the key TTL of
        a Redis list it lands in. Safe from any thread; raises `PublishError`.

        Returns how many listeners the message reached where the broker learns that for free
        (Redis PUBLISH counts its subscribers, an embedded broker its bound queues), else None.
        A caller waiting for replies stops once that many have come, and waits for nobody at 0
        (a worker that starts alone skips mingle's quiet window). Never an undercount: a
        listener not counted may go unheard.
        """
        raise NotSupported(unavailable(self))

    def listen(self, spec: Listen) -> Subscription:
        """Declare and bind `spec`'s queue and start listening on it, on a connection of its
        own (for one thread). Raises `BrokerError` if the broker cannot be reached."""
        raise NotSupported(unavailable(self))

    def claims(self) -> Claims:
        """Leases and a little state held by this broker (see `millpond.contracts.claims`), for
        schedulers that run on several replicas; optional."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot hold claims (needed by `millpond beat`); use the "
            "redis:// or the embedded sqlite:// broker"
        )

    def default_backend(self) -> ResultBackend | None:
        """The result backend to use when none is configured (the broker's own store), if any."""
        return None

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
