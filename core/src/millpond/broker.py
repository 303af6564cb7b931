"""The broker and result-backend contracts every transport plugin implements.

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
import select
import socket
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar
from urllib.parse import urlsplit, urlunsplit

from millpond.protocol import Message

T = TypeVar("T")


#: query parameters that carry a secret (`?sentinel_password=...`, `?token=...`)
_SECRET_QUERY = re.compile(
    r"((?:^|[&;])[^=&;]*(?:password|passwd|secret|token)[^=&;]*=)[^&;]*", re.I
)


def mask_url(url: str | None) -> str:
    """The URL with its password (and secret query parameters) replaced by `***`, for banners
    and logs."""
    if not url:
        return ""
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


class Waker:
    """A self-pipe a blocked consumer can `select()` on next to its broker socket.

    `wake()` may be called from any thread (and from a signal handler); it is idempotent until
    `clear()`. The socket pair works with gevent's and eventlet's patched `select` too.
    """

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._set = False

    def fileno(self) -> int:
        return self._r.fileno()

    def wake(self) -> None:
        if self._set:
            return
        self._set = True
        try:
            self._w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already full of wake-ups, or closed at shutdown

    def clear(self) -> None:
        if not self._set:
            return  # nothing was written since the last clear: skip the recv() syscall
        self._set = False
        try:
            while self._r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    @property
    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None) -> bool:
        """Block until woken or `timeout` seconds pass; returns whether it was woken."""
        if self._set:
            return True
        try:
            ready, _, _ = select.select([self._r], [], [], timeout)
        except (OSError, ValueError):
            return True
        return bool(ready)

    def close(self) -> None:
        for sock in (self._r, self._w):
            try:
                sock.close()
            except OSError:
                pass


class Inbox(Generic[T]):
    """A thread-safe queue whose arrivals wake the consumer loop at once (see `Waker`)."""

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self.waker = Waker()

    def put(self, item: T) -> None:
        self._items.append(item)
        self.waker.wake()

    def put_quiet(self, item: T) -> None:
        """Add without waking: for the loop's own thread, which drains before it next waits."""
        self._items.append(item)

    def drain(self) -> list[T]:
        self.waker.clear()
        items = self._items
        out: list[T] = []
        while items:
            out.append(items.popleft())
        return out

    def __len__(self) -> int:
        return len(self._items)


class Consumer(ABC):
    """Receives messages from a set of queues for one worker; used from the consumer loop only."""

    @abstractmethod
    def fetch(self, max_count: int, timeout: float, waker: Waker | None = None) -> list[Delivery]:
        """Return 1..max_count deliveries as soon as any is available.

        Block at most `timeout` seconds; return early (possibly empty) when `waker` becomes readable.
        Never return more than `max_count`: that is how the prefetch limit is kept.
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

    def dead_letters(self, queue: str, limit: int = 100) -> list[Message]:
        """Messages in the queue's dead-letter destination, oldest first; optional."""
        raise NotImplementedError(f"{type(self).__name__} cannot list dead letters")

    def replay_dead_letters(self, queue: str, limit: int | None = None) -> int:
        """Move dead-lettered messages back to their queue; return how many; optional."""
        raise NotImplementedError(f"{type(self).__name__} cannot replay dead letters")

    def default_backend(self) -> ResultBackend | None:
        """The result backend to use when none is configured (the broker's own store), if any."""
        return None

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- results ---------------------------------------------------------------------------------------

PENDING = "PENDING"
STARTED = "STARTED"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
RETRY = "RETRY"
REVOKED = "REVOKED"
READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})


@dataclass(slots=True)
class ResultMeta:
    """A task's stored outcome, in Celery's result layout (`celery-task-meta-<id>` as JSON).

    For failures `result` is `{"exc_type", "exc_message", "exc_module"}` like Celery stores it.
    """

    task_id: str
    status: str
    result: Any = None
    traceback: str | None = None
    date_done: str | None = None
    name: str | None = None
    retries: int = 0
    children: list[Any] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "result": self.result,
            "traceback": self.traceback,
            "children": self.children,
            "date_done": self.date_done,
            "task_id": self.task_id,
            "name": self.name,
            "retries": self.retries,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResultMeta:
        return cls(
            task_id=str(data.get("task_id", "")),
            status=str(data.get("status", PENDING)),
            result=data.get("result"),
            traceback=data.get("traceback"),
            date_done=data.get("date_done"),
            name=data.get("name"),
            retries=int(data.get("retries") or 0),
            children=list(data.get("children") or []),
        )


class ResultBackend(ABC):
    """Stores task outcomes and lets callers wait for them (chosen through `millpond.backends`)."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.options: Mapping[str, Any] = dict(options or {})

    @abstractmethod
    def store(self, meta: ResultMeta) -> None:
        """Save an outcome (replacing an earlier state of the same task) and wake its waiters."""

    @abstractmethod
    def get(self, task_id: str, timeout: float | None) -> ResultMeta | None:
        """Wait until the task is in a ready state or `timeout` passes (None: forever).

        Returns the newest stored meta (ready or not), or None when nothing is stored. Waiting
        must wake on completion (pub/sub, blocking pop, condition), not poll once a second.
        """

    @abstractmethod
    def peek(self, task_id: str) -> ResultMeta | None:
        """The stored meta right now, without waiting."""

    @abstractmethod
    def forget(self, task_id: str) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def socket_wait(sock: Any, waker: Waker | None, timeout: float) -> bool:
    """Wait until `sock` is readable or `waker` fires; returns True when the socket is readable.

    A helper for socket-based consumers (`sock` is anything with `fileno()`).
    """
    fds: list[Any] = [sock]
    if waker is not None:
        if waker.is_set:
            return False
        fds.append(waker)
    try:
        ready, _, _ = select.select(fds, [], [], timeout)
    except (OSError, ValueError):
        return False
    return any(r is sock for r in ready)
