"""`PostgresResultBackend`: Celery's result layout as JSON rows, with waiting that wakes on NOTIFY.

A result is the JSON of `ResultMeta` (Celery's `celery-task-meta-<id>` document) in the `results`
table, kept for `result_expires` seconds (0: for ever): an expired row is never returned, and the
storing processes delete expired rows in small batches, at most once a minute each. Every store
is one statement that upserts the row and `NOTIFY`s the task's channel, both at its commit.

`get()` listens first and reads second, on a waiting connection of the calling thread's own, so
a result stored in between is never missed; then it sleeps in `select()` on that connection and
re-reads only when notified. Groups (`GroupResult.save`) are kept in the `groups` table the same
way.

Chords join in two tables, `chords` (size, claim, done) and `chord_parts` (one row per header
task, by task id and index, so a redelivered part counts once). Each return is one transaction
holding the chord's row lock: it adds the part, and if that completes the join and no live claim
exists, claims it for `claim_ttl` seconds and returns every part in header order, to exactly one
caller; the claimant sends the body and marks the chord done. A claim whose worker died lapses
and passes to the next caller (the redelivered header task).
"""

from __future__ import annotations

import json
import logging
import os
import select
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql

from millpond.contracts.backend import CHORD_CLAIM_TTL, ChordPart, ResultBackend, ResultMeta
from millpond.exceptions import BackendError
from millpond.states import READY_STATES
from millpond_broker_postgres import schema
from millpond_broker_postgres.connection import RETRYABLE, close_quietly, connect
from millpond_broker_postgres.store import Store

log = logging.getLogger("millpond.broker.postgres")

Conn = psycopg.Connection[tuple[Any, ...]]
#: one wait on the LISTEN socket lasts at most this long before the row is read again (so a
#: silently dead connection is noticed and a result that expired meanwhile is seen as gone)
_SLICE = 5.0
_EXPIRE_EVERY = 60.0


def _meta(task_id: str, value: Any) -> ResultMeta | None:
    if value is None:
        return None
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise BackendError(f"stored result of task {task_id} is not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise BackendError(f"stored result of task {task_id} is not a JSON object")
    value.setdefault("task_id", task_id)
    return ResultMeta.from_json(value)


def _ignore(_notify: psycopg.Notify) -> None:
    pass


class PostgresResultBackend(ResultBackend):
    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self.store_ = Store(url, self.options, "results")
        self.cfg = self.store_.cfg
        self.sql = self.store_.sql
        self._local = threading.local()
        self._expired_at = 0.0
        #: how long the join of a chord stays claimed by the caller that completed it
        self.claim_ttl = CHORD_CLAIM_TTL

    def __repr__(self) -> str:
        return f"<PostgresResultBackend {self.cfg.masked_url}>"

    def _run(self, what: str, statement: Any, params: Any) -> psycopg.Cursor[tuple[Any, ...]]:
        self.store_.ensure_schema()
        return self.store_.pool.run(what, lambda c: c.execute(statement, params), BackendError)

    def store(self, meta: ResultMeta) -> None:
        data = json.dumps(meta.to_json(), separators=(",", ":"))  # not JSON: TypeError (contract)
        params = {
            "id": meta.task_id,
            "meta": data,
            "ttl": float(self.cfg.result_expires),
            "channel": schema.result_channel(meta.task_id),
        }
        self._run(f"storing the result of task {meta.task_id}", self.sql.store_result, params)
        self._expire()

    def _expire(self) -> None:
        """Delete expired rows now and then (a row past its expiry is never returned anyway)."""
        now = time.monotonic()
        if not self.cfg.result_expires or now - self._expired_at < _EXPIRE_EVERY:
            return
        self._expired_at = now
        try:
            self._run("deleting expired results", self.sql.expire_results, None)
        except BackendError as exc:
            log.debug("postgres: could not delete expired results (%s)", exc)

    def peek(self, task_id: str) -> ResultMeta | None:
        cur = self._run(f"reading the result of task {task_id}", self.sql.peek_result, [task_id])
        row = cur.fetchone()
        return _meta(task_id, row[0] if row else None)

    # -- waiting ---------------------------------------------------------------------------------
    def _waiter(self) -> Conn:
        """This thread's waiting connection (LISTEN does not mix with a shared pool)."""
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) != os.getpid():
            conn = None  # inherited over fork: the parent's; never touched here
        if conn is None or conn.closed or conn.broken:
            self.store_.ensure_schema()
            conn = connect(self.cfg, "results")
            # notifications read while a statement runs only woke us: a handler keeps psycopg
            # from keeping them in a backlog nobody reads
            conn.add_notify_handler(_ignore)
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    def get(self, task_id: str, timeout: float | None) -> ResultMeta | None:
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        listen = sql.SQL("LISTEN {}").format(sql.Identifier(schema.result_channel(task_id)))
        unlisten = sql.SQL("UNLISTEN {}").format(sql.Identifier(schema.result_channel(task_id)))
        failing_since: float | None = None
        while True:
            conn: Conn | None = None
            try:
                conn = self._waiter()
                conn.execute(listen)
                try:
                    row = conn.execute(self.sql.peek_result, [task_id]).fetchone()
                    meta = _meta(task_id, row[0] if row else None)
                    failing_since = None
                    while meta is None or meta.status not in READY_STATES:
                        left = _SLICE if deadline is None else deadline - time.monotonic()
                        if left <= 0:
                            return meta
                        ready, _, _ = select.select([conn.fileno()], [], [], min(left, _SLICE))
                        if ready:
                            conn.pgconn.consume_input()
                            while conn.pgconn.notifies() is not None:
                                pass
                        row = conn.execute(self.sql.peek_result, [task_id]).fetchone()
                        meta = _meta(task_id, row[0] if row else None) or meta
                    return meta
                finally:
                    if not conn.broken:
                        conn.execute(unlisten)
            except RETRYABLE as exc:
                close_quietly(conn)
                self._local.conn = None
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since >= self.cfg.publish_retry_timeout or (
                    deadline is not None and now >= deadline
                ):
                    raise BackendError(
                        f"waiting for the result of task {task_id} failed: PostgreSQL at "
                        f"{self.cfg.masked_url} is unreachable ({str(exc).strip()}); the task may "
                        "still finish, ask again later"
                    ) from exc
                time.sleep(0.1)
            except psycopg.Error as exc:
                raise BackendError(
                    f"waiting for the result of task {task_id} failed: PostgreSQL said: {exc}"
                ) from exc

    def forget(self, task_id: str) -> None:
        self._run(f"forgetting the result of task {task_id}", self.sql.forget_result, [task_id])

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            close_quietly(conn)
        self._local = threading.local()
        self.store_.close()

    # -- groups ----------------------------------------------------------------------------------
    def save_group(self, group_id: str, value: Any) -> None:
        """`{"result": <the group's as_tuple>}`, as Celery saves a group."""
        try:
            data = json.dumps({"result": value})
        except (TypeError, ValueError) as exc:
            raise BackendError(f"group {group_id} cannot be stored as JSON: {exc}") from exc
        params = {"id": group_id, "value": data, "ttl": float(self.cfg.result_expires)}
        self._run(f"saving group {group_id}", self.sql.save_group, params)

    def restore_group(self, group_id: str) -> Any:
        row = self._run(
            f"restoring group {group_id}", self.sql.restore_group, [group_id]
        ).fetchone()
        if row is None:
            return None
        data = row[0]
        if not isinstance(data, dict) or "result" not in data:
            raise BackendError(f"saved group {group_id} is not a {{'result': ...}} object")
        return data["result"]

    def forget_group(self, group_id: str) -> None:
        self._run(f"forgetting group {group_id}", self.sql.forget_group, [group_id])

    # -- chords ----------------------------------------------------------------------------------
    supports_chords = True

    def _transaction(self, what: str, op: Any) -> Any:
        """`op(conn)` inside one transaction, retried as a whole on connection trouble."""
        self.store_.ensure_schema()

        def run(conn: Conn) -> Any:
            with conn.transaction():
                return op(conn)

        return self.store_.pool.run(what, run, BackendError)

    def set_chord_size(self, group_id: str, size: int) -> None:
        params = {"id": group_id, "size": int(size), "ttl": float(self.cfg.result_expires)}

        def op(conn: Conn) -> None:
            conn.execute(self.sql.chord_start, params)
            conn.execute(self.sql.chord_clear, [group_id])

        self._transaction(f"starting chord {group_id}", op)

    def chord_part_return(
        self, group_id: str, task_id: str, index: int | None, state: str, result: Any
    ) -> list[ChordPart] | None:
        try:
            text = json.dumps(result, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise BackendError(
                f"the chord part of task {task_id} cannot be stored as JSON: {exc}"
            ) from exc
        order = float(index) if index is not None else 1e300  # no index: after the indexed
        # one per call: a retry of this call after a lost commit reply finds its own claim
        token = uuid.uuid4().hex

        def op(conn: Conn) -> list[ChordPart] | None:
            row = conn.execute(self.sql.chord_lock, [group_id]).fetchone()
            if row is None or row[2]:
                return None  # unknown (expired) or done: a late copy of a part
            size, claimed = int(row[0]), bool(row[1]) and row[3] != token
            conn.execute(self.sql.chord_add, [group_id, task_id, order, str(state), text])
            counted = conn.execute(self.sql.chord_count, [group_id]).fetchone()
            if (int(counted[0]) if counted else 0) < size or claimed:
                return None
            conn.execute(self.sql.chord_claim, [float(self.claim_ttl), token, group_id])
            rows = conn.execute(self.sql.chord_parts, [group_id]).fetchall()
            return [(str(t), str(st), value) for t, st, value in rows]

        result_parts: list[ChordPart] | None = self._transaction(
            f"returning the chord part of task {task_id}", op
        )
        return result_parts

    def chord_done(self, group_id: str) -> None:
        def op(conn: Conn) -> None:
            conn.execute(self.sql.chord_done, [group_id])
            conn.execute(self.sql.chord_clear, [group_id])

        self._transaction(f"ending chord {group_id}", op)

    def chord_claim_expires(self, group_id: str) -> float | None:
        row = self._run(
            f"reading the claim of chord {group_id}", self.sql.chord_claimed, [group_id]
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def chord_release(self, group_id: str) -> None:
        self._run(f"releasing chord {group_id}", self.sql.chord_release, [group_id])
