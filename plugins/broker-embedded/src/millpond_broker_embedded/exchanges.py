"""Exchanges for the embedded brokers: routing by AMQP's rules, in memory or in the SQLite file.

Both keep the contract's semantics (`millpond.contracts.broadcast`): a message reaches every
listening queue bound to its exchange whose binding matches the routing key (`routes_to`), each
queue keeps it until it is read or its time-to-live ends, and a queue with nobody left reading
it goes away (memory: when it is closed; SQLite: when its binding's lease lapses, for a process
that died without closing it).

memory:// routes within one process; sqlite:// routes between the processes of one machine:
`bindings` holds who listens (refreshed while they read), `broadcasts` one row per message and
listening queue, read and deleted by the listener, which polls with the same back-off as the
consumer (1 ms to 25 ms).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from millpond.contracts.broadcast import Exchange, ExchangeKind, Listen, Received, Subscription
from millpond.exceptions import BrokerError, MalformedMessage, PublishError
from millpond.wire import envelope
from millpond.wire.protocol import Message
from millpond_broker_embedded.sqlite_errors import translate as _translate

if TYPE_CHECKING:
    from millpond_broker_embedded.sqlite import SqliteBroker

#: how long a message waits for a queue that set no `message_ttl` (Celery's pidbox default)
DEFAULT_TTL: Final = 300.0
#: how long a SQLite binding lives without its listener reading (refreshed at a third of it)
BINDING_LEASE: Final = 30.0
_BATCH: Final = 100


SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS bindings (
    queue TEXT NOT NULL,
    exchange TEXT NOT NULL,
    kind TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    message_ttl REAL NOT NULL,
    expires REAL NOT NULL,                  -- the listener's lease: it refreshes it while reading
    PRIMARY KEY (exchange, queue, routing_key)
);
CREATE TABLE IF NOT EXISTS broadcasts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    expires REAL NOT NULL,
    envelope TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS broadcasts_queue ON broadcasts (queue, id);
"""


def check_queue(queue: object) -> str:
    """A queue name of either embedded broker, checked."""
    if not isinstance(queue, str) or not queue:
        raise ValueError(f"a queue name must be a non-empty string, got {queue!r}")
    return queue


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


def _ttl(spec_ttl: float | None, message_ttl: float | None) -> float:
    ttls = [t for t in (spec_ttl, message_ttl) if t is not None]
    return min(ttls) if ttls else DEFAULT_TTL


def _json_checked(message: Message, exchange: str, routing_key: str) -> str:
    try:
        return envelope.dumps(message, queue=routing_key, exchange=exchange)
    except (TypeError, ValueError) as exc:
        raise PublishError(
            f"message for exchange {exchange!r} has headers or properties a broker cannot carry "
            f"({exc}); use JSON-compatible values"
        ) from exc


# -- memory:// -----------------------------------------------------------------------------------


@dataclass
class _Bound:
    spec: Listen
    items: deque[tuple[float, str, str, str]] = field(default_factory=deque)
    readers: int = 0


class MemoryExchanges:
    """One memory:// state's exchanges; every field is guarded by `cond`."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.queues: dict[str, _Bound] = {}

    def broadcast(
        self, exchange: Exchange, message: Message, routing_key: str, ttl: float | None
    ) -> int:
        """Append to every bound queue the message routes to; how many there were."""
        text = _json_checked(message, exchange.name, routing_key)
        now = time.monotonic()
        reached = 0
        with self.cond:
            for bound in self.queues.values():
                spec = bound.spec
                if spec.exchange.name == exchange.name and routes_to(
                    spec.exchange.kind, spec.routing_key, routing_key
                ):
                    expires = now + _ttl(ttl, spec.message_ttl)
                    bound.items.append((expires, exchange.name, routing_key, text))
                    reached += 1
            self.cond.notify_all()
        return reached

    def listen(self, spec: Listen) -> MemorySubscription:
        with self.cond:
            bound = self.queues.get(spec.queue)
            if bound is None:
                bound = self.queues[spec.queue] = _Bound(spec)
            bound.readers += 1
        return MemorySubscription(self, bound)


class MemorySubscription(Subscription):
    def __init__(self, exchanges: MemoryExchanges, bound: _Bound) -> None:
        self._exchanges = exchanges
        self._bound = bound
        self._closed = False

    def receive(self, timeout: float) -> list[Received]:
        cond = self._exchanges.cond
        deadline = time.monotonic() + max(0.0, timeout)
        out: list[Received] = []
        with cond:
            while not self._closed:
                items = self._bound.items
                now = time.monotonic()
                while items and len(out) < _BATCH:
                    expires, exchange, routing_key, text = items.popleft()
                    if expires > now:
                        out.append(Received(envelope.loads(text), exchange, routing_key))
                if out or now >= deadline:
                    break
                cond.wait(deadline - now)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        exchanges = self._exchanges
        with exchanges.cond:
            self._bound.readers -= 1
            name = self._bound.spec.queue
            if (
                self._bound.readers <= 0
                and self._bound.spec.auto_delete
                and exchanges.queues.get(name) is self._bound
            ):
                del exchanges.queues[name]
            exchanges.cond.notify_all()


# -- sqlite:// -----------------------------------------------------------------------------------


def sqlite_broadcast(
    broker: SqliteBroker,
    exchange: Exchange,
    message: Message,
    routing_key: str,
    ttl: float | None,
) -> int:
    """Insert a copy for every bound queue the message routes to; how many there were (a
    binding outlives its listener until its lease runs out, so this may count a dead one)."""
    text = _json_checked(message, exchange.name, routing_key)
    now = time.time()
    translated = _translate(f"publish to exchange {exchange.name!r}", broker.path, PublishError)
    with translated, broker.db.write() as conn:
        rows = conn.execute(
            "SELECT queue, kind, routing_key, message_ttl FROM bindings "
            "WHERE exchange = ? AND expires > ?",
            (exchange.name, now),
        ).fetchall()
        targets: dict[str, float] = {}
        for queue, kind, binding_key, message_ttl in rows:
            if routes_to(kind, binding_key, routing_key):
                targets[queue] = _ttl(ttl, message_ttl if message_ttl > 0 else None)
        conn.executemany(
            "INSERT INTO broadcasts (queue, exchange, routing_key, expires, envelope) "
            "VALUES (?, ?, ?, ?, ?)",
            [(q, exchange.name, routing_key, now + t, text) for q, t in targets.items()],
        )
        conn.execute("DELETE FROM broadcasts WHERE expires <= ?", (now,))
        conn.execute("DELETE FROM bindings WHERE expires <= ?", (now,))
    return len(targets)


class SqliteSubscription(Subscription):
    """A listening queue in the SQLite file, read by polling."""

    def __init__(self, broker: SqliteBroker, spec: Listen) -> None:
        self.broker = broker
        self.spec = spec
        self._closed = False
        self._renew_at = 0.0
        self._renew()

    def _renew(self) -> None:

        spec = self.spec
        lease = spec.expires if spec.expires is not None else BINDING_LEASE
        translated = _translate(f"listen on exchange {spec.exchange.name!r}", self.broker.path)
        with translated, self.broker.db.write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO bindings "
                "(queue, exchange, kind, routing_key, message_ttl, expires) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    spec.queue,
                    spec.exchange.name,
                    spec.exchange.kind,
                    spec.routing_key,
                    spec.message_ttl or 0.0,
                    time.time() + max(lease, BINDING_LEASE),
                ),
            )
        self._renew_at = time.monotonic() + BINDING_LEASE / 3

    def receive(self, timeout: float) -> list[Received]:
        deadline = time.monotonic() + max(0.0, timeout)
        pause = 0.001
        while not self._closed:
            try:
                if time.monotonic() >= self._renew_at:
                    self._renew()
                got = self._take()
            except BrokerError:
                got = []
            now = time.monotonic()
            if got or now >= deadline:
                return got
            time.sleep(min(pause, deadline - now))  # polling: SQLite has no notification
            pause = min(pause * 2, 0.025)
        return []

    def _take(self) -> list[Received]:

        now = time.time()
        conn = self.broker.db.conn()
        with _translate("read broadcasts", self.broker.path):
            first = conn.execute(
                "SELECT 1 FROM broadcasts WHERE queue = ? LIMIT 1", (self.spec.queue,)
            ).fetchone()
            if first is None:
                return []
            with self.broker.db.write() as wconn:
                rows = wconn.execute(
                    "DELETE FROM broadcasts WHERE id IN (SELECT id FROM broadcasts WHERE queue = ? "
                    "ORDER BY id LIMIT ?) RETURNING id, exchange, routing_key, expires, envelope",
                    (self.spec.queue, _BATCH),
                ).fetchall()
        out: list[Received] = []
        for _id, exchange, routing_key, expires, text in sorted(rows):
            if expires <= now:
                continue
            try:
                out.append(Received(envelope.loads(text), exchange, routing_key))
            except MalformedMessage:
                continue
        return out

    def close(self) -> None:

        if self._closed:
            return
        self._closed = True
        spec = self.spec
        if not spec.auto_delete:
            return
        try:
            with _translate("stop listening", self.broker.path), self.broker.db.write() as conn:
                conn.execute(
                    "DELETE FROM bindings WHERE exchange = ? AND queue = ? AND routing_key = ?",
                    (spec.exchange.name, spec.queue, spec.routing_key),
                )
                conn.execute("DELETE FROM broadcasts WHERE queue = ?", (spec.queue,))
        except BrokerError:
            pass
