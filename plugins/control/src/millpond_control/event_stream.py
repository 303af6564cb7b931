"""Reading the `celeryev` exchange: every event any worker sends, millpond's or Celery's.

`EventStream` listens the way Celery's `EventReceiver` does (a queue of its own bound with `#`,
whose messages expire after 5 s and which goes away a minute after its reader did, Celery's
`event_queue_ttl` / `event_queue_expires`), and unpacks Celery's batches (`task.multi` lists) into
single events. `millpond events` prints what it reads; a test or a small monitor can use it for
users without Celery installed.
"""

from __future__ import annotations

import fnmatch
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from millpond.contracts.broadcast import Listen, unavailable
from millpond.exceptions import NotSupported
from millpond_control.events_hooks import event_exchange

if TYPE_CHECKING:
    from millpond.contracts.broadcast import Received, Subscription
    from millpond.contracts.broker import Broker

#: Celery's `event_queue_ttl` and `event_queue_expires`
QUEUE_TTL = 5.0
QUEUE_EXPIRES = 60.0


def decode(received: Received) -> list[dict[str, Any]]:
    """The events in one message (one, or a list); raises ValueError for what is not an event."""
    message = received.message
    if message.content_type != "application/json":
        raise ValueError(f"an event in {message.content_type!r}, not JSON: not read")
    body = json.loads(bytes(message.body).decode(message.content_encoding or "utf-8"))
    found = body if isinstance(body, list) else [body]
    if not all(isinstance(e, dict) and isinstance(e.get("type"), str) for e in found):
        raise ValueError("a message on the event exchange that is not an event: not read")
    return found


class EventStream:
    """A listener on the event exchange; for one thread, like the `Subscription` it holds."""

    def __init__(self, broker: Broker, types: str = "*", hostnames: str = "*") -> None:
        """`types` and `hostnames` are shell-style patterns (`task-*`, `*@web1`) events must match."""
        if not broker.supports_broadcast:
            raise NotSupported(unavailable(broker))
        self.types = types
        self.hostnames = hostnames
        self.skipped = 0
        spec = Listen(
            f"millpond.events.{uuid.uuid4().hex}",
            event_exchange(broker.system),
            routing_key="#",
            durable=False,
            auto_delete=True,
            message_ttl=QUEUE_TTL,
            expires=QUEUE_EXPIRES,
        )
        self._sub: Subscription = broker.listen(spec)

    def receive(self, timeout: float) -> list[dict[str, Any]]:
        """The events that arrived, waiting at most `timeout` seconds for the first."""
        out: list[dict[str, Any]] = []
        for received in self._sub.receive(timeout):
            try:
                found = decode(received)
            except ValueError:
                self.skipped += 1
                continue
            out.extend(
                e
                for e in found
                if fnmatch.fnmatchcase(e["type"], self.types)
                and fnmatch.fnmatchcase(str(e.get("hostname", "")), self.hostnames)
            )
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.receive(1.0)

    def close(self) -> None:
        self._sub.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: the fields `describe` shows after an event's type, when it has them
_SHOWN = (
    "uuid", "name", "args", "kwargs", "retries", "eta", "result", "runtime", "exception",
    "requeue", "expired", "terminated", "active", "processed", "freq", "sw_ident", "sw_ver",
)  # fmt: skip


def describe(event: dict[str, Any]) -> str:
    """One readable line for an event: when, who, what, and its main fields."""
    try:
        when = datetime.fromtimestamp(float(event.get("timestamp", 0)), UTC)
        stamp = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (TypeError, ValueError, OverflowError):
        stamp = "?"
    parts = [stamp, str(event.get("hostname", "?")), event["type"]]
    parts += [f"{name}={event[name]}" for name in _SHOWN if event.get(name) is not None]
    return " ".join(parts)
