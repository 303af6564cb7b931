"""What the broker and the result backend share: the config, the statements, a connection pool
and making sure the schema exists (once per process and schema)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from typing import Any

import psycopg

from millpond.exceptions import BrokerError, ConfigurationError, PublishError
from millpond.wire.protocol import Message
from millpond_broker_postgres import schema
from millpond_broker_postgres.config import PostgresConfig, parse
from millpond_broker_postgres.connection import Pool

log = logging.getLogger("millpond.broker.postgres")

_ensured: set[tuple[str, str]] = set()
_ensure_lock = threading.Lock()


class Store:
    """One URL's configuration, statements and producer connections."""

    def __init__(self, url: str, options: Mapping[str, Any] | None, purpose: str) -> None:
        self.cfg: PostgresConfig = parse(url, options)
        self.sql = schema.statements(self.cfg.schema)
        self.pool = Pool(self.cfg, purpose)

    def ensure_schema(self) -> None:
        """Create (or upgrade) the tables when they are missing; a no-op once done here."""
        key = (self.cfg.conninfo, self.cfg.schema)
        if key in _ensured:
            return
        with _ensure_lock:
            if key in _ensured:
                return
            self.pool.run("creating millpond's tables", self._ensure, BrokerError)
            _ensured.add(key)

    def _ensure(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        try:
            row = conn.execute(self.sql.version).fetchone()
            if row is not None and row[0] is not None and int(row[0]) >= schema.VERSION:
                return
        except psycopg.errors.UndefinedTable:
            pass
        except psycopg.errors.InvalidSchemaName:
            pass
        try:
            with conn.transaction():
                # one creator at a time: concurrent CREATE ... IF NOT EXISTS can still collide
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [self.cfg.schema])
                conn.execute(self.sql.ddl)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise ConfigurationError(
                f"the role cannot create millpond's tables in schema {self.cfg.schema!r} "
                f"({str(exc).strip()}); create them once as a role that may (run `millpond "
                "worker` once as the owner) or grant CREATE on the database"
            ) from exc
        log.info("postgres: created millpond's tables in schema %r", self.cfg.schema)

    def close(self) -> None:
        self.pool.close()


def row_of(queue: str, message: Message) -> tuple[str, bytes, str, str, str, str]:
    """The columns of one message: (queue, body, headers JSON, properties JSON, type, encoding)."""
    try:
        headers = json.dumps(message.headers, separators=(",", ":"))
        properties = json.dumps(message.properties, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise PublishError(
            f"message for queue {queue!r} cannot be stored: {exc}; headers and properties must "
            "hold JSON values only"
        ) from exc
    if "\\u0000" in headers or "\\u0000" in properties:
        raise PublishError(
            f"message for queue {queue!r} cannot be stored: its headers or properties hold a NUL "
            "character, which PostgreSQL's jsonb cannot keep"
        )
    return (
        queue,
        bytes(message.body),
        headers,
        properties,
        message.content_type,
        message.content_encoding,
    )


def message_of(row: tuple[Any, ...]) -> Message:
    """A Message from (body, headers, properties, content_type, content_encoding)."""
    body, headers, properties, content_type, content_encoding = row
    return Message(
        body=bytes(body),
        headers=dict(headers),
        content_type=str(content_type),
        content_encoding=str(content_encoding),
        properties=dict(properties),
    )
