"""`PostgresBroker`: publishing, delays, dead letters and administration on the messages table.

Producing is safe from any thread (each call borrows a connection of its own) and after
`os.fork()` (the pool is rebuilt when the pid changes). A publish returns once its INSERT has
committed: the message is durable then, as durable as the server's WAL. One that cannot reach
the server is retried with backoff for `publish_retry_timeout` seconds, then raises
`PublishError`; a retry after a lost reply may store a message twice (at-least-once).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import psycopg

from millpond.contracts.broker import Broker, Outbound, dead_letter_queue
from millpond.exceptions import BrokerError, PublishError
from millpond.wire.protocol import Message
from millpond_broker_postgres.backend import PostgresResultBackend
from millpond_broker_postgres.consumer import PostgresConsumer
from millpond_broker_postgres.store import Store, message_of, row_of

log = logging.getLogger("millpond.broker.postgres")

Conn = psycopg.Connection[tuple[Any, ...]]
_REPLAY_BATCH = 500


def _check_queue(queue: str) -> str:
    if not isinstance(queue, str) or not queue:
        raise BrokerError(f"a queue name must be a non-empty string, got {queue!r}")
    if "\x00" in queue:
        raise BrokerError(f"queue name {queue!r} holds a NUL character")
    return queue


def _check_eta(eta: float | None) -> float | None:
    if eta is None:
        return None
    if isinstance(eta, bool) or not isinstance(eta, int | float) or not math.isfinite(eta):
        raise PublishError(f"eta must be a finite number of epoch seconds, got {eta!r}")
    return float(eta) if eta > time.time() else None


def _first(cursor: psycopg.Cursor[tuple[Any, ...]]) -> int:
    row = cursor.fetchone()
    return int(row[0]) if row else 0


class PostgresBroker(Broker):
    system: ClassVar[str] = "postgresql"
    supports_delay: ClassVar[bool] = True

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self.store = Store(url, self.options, "producer")
        self.cfg = self.store.cfg
        self.sql = self.store.sql
        self._said_priority = False

    def __repr__(self) -> str:
        return f"<PostgresBroker {self.cfg.masked_url}>"

    def connect(self) -> None:
        self.store.ensure_schema()

    def close(self) -> None:
        self.store.close()

    # -- topology --------------------------------------------------------------------------------
    def declare(self, queues: Iterable[str]) -> None:
        """Queues need no DDL: this creates the tables if needed and records the names."""
        names = [_check_queue(q) for q in queues]
        self.connect()
        names += [dead_letter_queue(q) for q in names]
        if names:
            self.store.pool.run(
                "declaring queues", lambda c: c.execute(self.sql.declare, [names]), BrokerError
            )

    # -- producing -------------------------------------------------------------------------------
    def _warn_priority(self, message: Message) -> None:
        if not self._said_priority and message.properties.get("priority"):
            self._said_priority = True
            log.warning(
                "postgres: a message was sent with priority %r; the Postgres broker serves "
                "each queue oldest first and ignores priorities: use a separate queue (and "
                "worker) for urgent tasks",
                message.properties.get("priority"),
            )

    def publish(self, queue: str, message: Message, *, eta: float | None = None) -> None:
        self.connect()
        row = row_of(_check_queue(queue), message)
        due = _check_eta(eta)
        self._warn_priority(message)
        params = [row[0], due, *row[1:]]
        self.store.pool.run(
            f"publishing to {queue!r}", lambda c: c.execute(self.sql.publish, params), PublishError
        )

    def publish_many(self, batch: Sequence[Outbound]) -> None:
        """The whole batch, delayed messages included, in one INSERT (one round trip, one
        commit, one notification per queue)."""
        if not batch:
            return
        self.connect()
        columns: list[list[Any]] = [[] for _ in range(7)]
        for item in batch:
            row = row_of(_check_queue(item.queue), item.message)
            self._warn_priority(item.message)
            values = (row[0], _check_eta(item.eta), *row[1:])
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        self.store.pool.run(
            f"publishing {len(batch)} messages",
            lambda c: c.execute(self.sql.publish_many, columns),
            PublishError,
        )

    # -- consuming -------------------------------------------------------------------------------
    def consumer(self, queues: Sequence[str], prefetch: int) -> PostgresConsumer:
        self.connect()
        return PostgresConsumer(self, [_check_queue(q) for q in queues], prefetch)

    # -- administration --------------------------------------------------------------------------
    def _count(self, what: str, statement: Any, queue: str) -> int:
        self.connect()

        def op(c: Conn) -> int:
            row = c.execute(statement, [_check_queue(queue)]).fetchone()
            return int(row[0]) if row else 0

        return self.store.pool.run(what, op, BrokerError)

    def purge(self, queue: str) -> int:
        """Remove every message of the queue that no consumer holds, delayed ones included."""
        self.connect()

        def op(c: Conn) -> int:
            return c.execute(self.sql.purge, [_check_queue(queue)]).rowcount

        return self.store.pool.run(f"purging {queue!r}", op, BrokerError)

    def queue_length(self, queue: str) -> int:
        return self._count(f"counting {queue!r}", self.sql.queue_length, queue)

    def delayed_count(self, queue: str) -> int:
        """Messages of `queue` waiting for their eta (held in the table, not in any worker)."""
        return self._count(f"counting delayed {queue!r}", self.sql.delayed_count, queue)

    def dead_letters(self, queue: str, limit: int = 100) -> list[Message]:
        if limit <= 0:
            return []
        self.connect()
        dead = dead_letter_queue(_check_queue(queue))

        def op(c: Conn) -> list[Message]:
            rows = c.execute(self.sql.dead_letters, [dead, limit]).fetchall()
            return [message_of(row[1:]) for row in rows]

        return self.store.pool.run(f"listing dead letters of {queue!r}", op, BrokerError)

    def replay_dead_letters(self, queue: str, limit: int | None = None) -> int:
        """Move dead letters back to their queue (oldest first, without the death reason, their
        delivery count started afresh), in batches."""
        self.connect()
        dead = dead_letter_queue(_check_queue(queue))
        moved = 0
        while limit is None or moved < limit:
            size = _REPLAY_BATCH if limit is None else min(_REPLAY_BATCH, limit - moved)
            count = self.store.pool.run(
                f"replaying dead letters of {queue!r}",
                lambda c, n=size: _first(c.execute(self.sql.replay, [queue, dead, n])),  # type: ignore[misc]
                BrokerError,
            )
            moved += count
            if count < size:
                break
        return moved

    def default_backend(self) -> PostgresResultBackend:
        return PostgresResultBackend(self.url, self.options)
