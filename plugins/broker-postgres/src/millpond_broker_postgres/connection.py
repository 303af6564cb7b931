"""Connections: opening them, a small fork-aware pool for producers, retries with backoff.

Producing and storing results happen from any thread (nested `.delay()` in pool threads) and
after `os.fork()` (prefork children). Each call borrows an idle autocommit connection from the
pool (or opens one) and gives it back, so threads never share a connection mid-statement. After a
fork the child never touches, or closes, the connections it inherited: closing one would send
libpq's goodbye over a socket the parent still uses, and the server would end the parent's
session. They are kept referenced and the child opens its own. (A copy the child lets go of is
safe: psycopg finalises a connection without a goodbye in a process other than its own.)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg

from millpond.exceptions import BrokerError
from millpond_broker_postgres.config import PostgresConfig

log = logging.getLogger("millpond.broker.postgres")

T = TypeVar("T")
#: what a retry may cure: the server went away, a connection broke, the server is starting up
RETRYABLE: tuple[type[Exception], ...] = (psycopg.OperationalError, psycopg.InterfaceError)
#: connections inherited over fork(): referenced for ever so they are never finalised (closed)
_INHERITED: list[psycopg.Connection[tuple[Any, ...]]] = []
#: the oldest server this plugin supports (CREATE OR REPLACE TRIGGER)
MIN_SERVER = 140000


def connect(cfg: PostgresConfig, purpose: str) -> psycopg.Connection[tuple[Any, ...]]:
    """A new autocommit connection; `purpose` is appended to application_name (pg_stat_activity
    shows which of a worker's connections is which)."""
    kwargs = cfg.connect_kwargs()
    name = kwargs.get("application_name") or "millpond"
    kwargs["application_name"] = f"{name} {purpose}"[:63]
    conn = psycopg.connect(cfg.conninfo, autocommit=True, **kwargs)
    if conn.info.server_version < MIN_SERVER:
        version = conn.info.server_version
        conn.close()
        raise BrokerError(
            f"PostgreSQL at {cfg.masked_url} is version {version // 10000}; "
            "millpond-broker-postgres needs 14 or newer; upgrade the server"
        )
    return conn


def close_quietly(conn: psycopg.Connection[tuple[Any, ...]] | None) -> None:
    if conn is None:
        return
    try:
        conn.close()
    except Exception:
        pass


class Pool:
    """Idle autocommit connections for producers and result stores, rebuilt after a fork."""

    def __init__(self, cfg: PostgresConfig, purpose: str) -> None:
        self.cfg = cfg
        self.purpose = purpose
        self._lock = threading.Lock()
        self._idle: list[psycopg.Connection[tuple[Any, ...]]] = []
        self._pid = os.getpid()
        self._closed = False

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    _INHERITED.extend(self._idle)
                    self._idle = []
                    self._pid = os.getpid()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        """Borrow a connection; a broken one is closed instead of being given back."""
        self._check_pid()
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None or conn.closed:
            conn = connect(self.cfg, self.purpose)
        ok = False
        try:
            yield conn
            ok = True
        finally:
            if ok and not conn.closed and not conn.broken and not self._closed:
                with self._lock:
                    if self._pid == os.getpid():
                        self._idle.append(conn)
                        conn = None
            if conn is not None and self._pid == os.getpid():
                close_quietly(conn)

    def run(self, what: str, op: Callable[[psycopg.Connection[tuple[Any, ...]]], T],
            error: type[Exception]) -> T:  # fmt: skip
        """Run `op` on a borrowed connection; on connection trouble back off and retry until
        `publish_retry_timeout` has passed, then raise `error` saying what failed and what to
        do. A retry after a lost reply may repeat a statement (at-least-once, like every retry)."""
        deadline = time.monotonic() + self.cfg.publish_retry_timeout
        delay = 0.05
        attempts = 0
        while True:
            attempts += 1
            try:
                with self.connection() as conn:
                    return op(conn)
            except RETRYABLE as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise error(
                        f"{what} failed: PostgreSQL at {self.cfg.masked_url} did not answer for "
                        f"{self.cfg.publish_retry_timeout:g}s ({attempts} attempts; last error "
                        f"{type(exc).__name__}: {str(exc).strip()}). Check that the server is "
                        "running and reachable; postgres.publish_retry_timeout sets how long to "
                        "keep trying"
                    ) from exc
                if attempts == 1:
                    log.warning("postgres: %s failed (%s); retrying for up to %.0fs", what,
                                str(exc).strip(), left)  # fmt: skip
                time.sleep(min(delay, left))
                delay = min(delay * 2, 2.0)
            except psycopg.Error as exc:
                raise error(
                    f"{what} failed: PostgreSQL at {self.cfg.masked_url} said: "
                    f"{type(exc).__name__}: {str(exc).strip()}"
                ) from exc

    def close(self) -> None:
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        if self._pid == os.getpid():
            for conn in idle:
                close_quietly(conn)
