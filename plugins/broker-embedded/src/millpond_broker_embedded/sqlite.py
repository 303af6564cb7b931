"""sqlite://: the zero-server default broker and result backend, for one machine.

Why SQLite: it is in every Python, it is durable, and with WAL mode many processes on one machine
can share a file safely. That is enough for a laptop, a demo or a small single-host deployment, and
it is what `millpond worker` uses when no broker URL is configured. It is not a network broker: a
file on NFS or shared between machines is not supported (SQLite's locking is not reliable there).

How the guarantees are kept:

* A message is a row. Fetching reserves rows for a consumer in one short `BEGIN IMMEDIATE`
  transaction; ack deletes them; reject puts them back or moves them to `<queue>.dead`.
* Leases: every consumer has a row in `consumers` that a heartbeat thread (its own connection)
  refreshes every `heartbeat_interval`, whatever the consumer loop is doing. A consumer whose lease
  (`expires`) has passed is dead: whichever process notices first (any fetch, publish or heartbeat,
  checked at most about once a second) returns its messages to their queues. A live worker running
  a long task keeps its lease, so the task is never delivered twice.
* Waiting has no cross-process notification: an idle `fetch` polls with a back-off from 1 ms to
  25 ms (an indexed read, no write lock), and `get()` on the result backend polls from 5 to 20 ms.
* Messages are stored as kombu's JSON envelope (`millpond.envelope`), so `sqlite3 broker.sqlite3
  "select envelope from messages"` shows them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote

from millpond.config.options import Section, declared, setting
from millpond.config.settings import millpond_home as core_home
from millpond.contracts.backend import CHORD_CLAIM_TTL, ChordPart, ResultBackend, ResultMeta
from millpond.contracts.broadcast import Exchange, Listen
from millpond.contracts.broker import Broker, Claims, Consumer, Delivery, Holder, dead_letter_queue
from millpond.contracts.waking import Waker
from millpond.exceptions import (
    BackendError,
    BrokerError,
    ConfigurationError,
    MalformedMessage,
    PublishError,
)
from millpond.states import READY_STATES
from millpond.wire import envelope
from millpond.wire.protocol import DEATH_REASON, Message
from millpond_broker_embedded import exchanges
from millpond_broker_embedded.sqlite_errors import translate as _translate

# under `millpond`, whose handler the worker configures (the name it had inside the core)
log = logging.getLogger("millpond.brokers.sqlite")

SCHEME = "sqlite"
DEFAULT_FILE = "broker.sqlite3"
SCHEMA_VERSION = 4  # 2: chords and saved groups; 3: exchanges (bindings, broadcasts); 4: claims
# and state (millpond beat)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused, so a stale ack cannot hit a new row
    queue TEXT NOT NULL,
    eta REAL NOT NULL,                      -- ready when eta <= now (wall clock, seconds)
    consumer TEXT,                          -- NULL: waiting; else the consumer holding it
    deliveries INTEGER NOT NULL DEFAULT 0,  -- how often it was handed out
    envelope TEXT NOT NULL                  -- kombu's JSON envelope
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, eta, id) WHERE consumer IS NULL;
CREATE INDEX IF NOT EXISTS messages_held ON messages (consumer) WHERE consumer IS NOT NULL;
CREATE TABLE IF NOT EXISTS consumers (
    id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    queues TEXT NOT NULL,
    started REAL NOT NULL,
    heartbeat REAL NOT NULL,
    expires REAL NOT NULL                   -- heartbeat + that consumer's lease_timeout
);
CREATE TABLE IF NOT EXISTS results (
    task_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    meta TEXT NOT NULL,
    stored REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_expiry ON results (expires);
CREATE TABLE IF NOT EXISTS chords (
    group_id TEXT PRIMARY KEY,
    size INTEGER NOT NULL,                  -- header results the join waits for
    claimed_until REAL NOT NULL DEFAULT 0,  -- the worker that completed it holds it until then
    done INTEGER NOT NULL DEFAULT 0,        -- the body was sent (or failed): ignore late parts
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chord_parts (
    group_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    idx REAL NOT NULL,                      -- the header index (a redelivered part counts once)
    state TEXT NOT NULL,
    result TEXT NOT NULL,
    PRIMARY KEY (group_id, task_id, idx)
);
CREATE TABLE IF NOT EXISTS saved_groups (
    group_id TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires REAL NOT NULL                   -- wall clock; a claim past it is free
);
CREATE TABLE IF NOT EXISTS state (
    namespace TEXT NOT NULL,
    field TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (namespace, field)
);
"""

# -- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SqliteOptions:
    """The [sqlite] section, in seconds: each field declares one setting (`SETTINGS` is derived
    from them), and `parse_url` gives a broker its validated values as one."""

    lease_timeout: float = setting(
        30.0,
        "Seconds without a heartbeat after which a consumer counts as dead and its messages go "
        "back to their queues.",
        minimum=0.1,
    )
    heartbeat_interval: float = setting(
        2.0,
        "Seconds between a consumer's lease renewals; must be shorter than lease_timeout.",
        minimum=0.01,
    )
    busy_timeout: float = setting(
        5.0,
        "Seconds a statement waits for another process's write lock before failing.",
        minimum=0.01,
    )
    result_expires: float = setting(
        86400.0,
        "Seconds a stored result is kept in the sqlite result backend.",
        minimum=0.01,
    )

    @property
    def reap_interval(self) -> float:
        """How often a process looks for dead consumers: about once a second, sooner if short."""
        return min(1.0, self.lease_timeout / 4)


#: the `[sqlite]` settings section (`MILLPOND_SQLITE__LEASE_TIMEOUT`, ...): the one declaration of
#: the options, whether they come from settings, a URL query parameter or an options mapping;
#: published under the `millpond.settings` entry-point group as `sqlite`, the URL scheme
SETTINGS = Section("sqlite", "Embedded sqlite broker", declared(SqliteOptions))


def millpond_home(env: Mapping[str, str] | None = None) -> Path:
    """`$MILLPOND_HOME`, else `$XDG_DATA_HOME/millpond`, else `~/.local/share/millpond`."""
    return core_home(
        env,
        purpose="the sqlite broker file (or give the file in the URL, e.g. "
        "sqlite:///var/lib/millpond/broker.sqlite3)",
    )


def parse_url(url: str, options: Mapping[str, Any] | None = None) -> tuple[Path, SqliteOptions]:
    """The database file and options of a `sqlite://` URL (`options` win over its query).

    `sqlite://` is the default file, `sqlite:///abs/path.db` an absolute path and
    `sqlite://rel/path.db` a path relative to the current directory (resolved now, so a later
    chdir does not move the broker).
    """
    prefix = f"{SCHEME}://"
    if not url.startswith(prefix):
        raise ConfigurationError(
            f"{url!r} is not a sqlite:// URL; use sqlite:// (the default file), "
            "sqlite:///absolute/path.db or sqlite://relative/path.db"
        )
    location, _, query = url[len(prefix) :].partition("?")
    location = unquote(location)
    if location in (":memory:", "/:memory:"):
        raise ConfigurationError(
            "sqlite://:memory: cannot be shared between connections; use memory:// for an "
            "in-process broker"
        )
    path = millpond_home() / DEFAULT_FILE if not location else Path(location).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    opts = SqliteOptions(**SETTINGS.resolve(options, url=url, query=query))
    if opts.heartbeat_interval >= opts.lease_timeout:
        raise ConfigurationError(
            f"heartbeat_interval ({opts.heartbeat_interval} s) must be shorter than lease_timeout "
            f"({opts.lease_timeout} s), or live consumers would lose their messages; "
            "a third of the lease or less is a good value"
        )
    return path, opts


# -- the database file -----------------------------------------------------------------------------

#: connections inherited through fork: never used or closed in the child (SQLite forbids both)
_inherited: list[sqlite3.Connection] = []


class _Database:
    """One SQLite file: a connection per thread and per process, opened on first use."""

    def __init__(self, path: Path, busy_timeout: float) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[tuple[int, sqlite3.Connection]] = []
        self._generation = 0
        self._schema_pid = 0

    def conn(self) -> sqlite3.Connection:
        pid = os.getpid()
        held = getattr(self._local, "held", None)
        if held is not None:
            held_pid, generation, conn = held
            if held_pid == pid and generation == self._generation:
                return conn  # type: ignore[no-any-return]
            if held_pid != pid:
                _inherited.append(conn)
            else:  # closed by `close()` in another thread: this thread closes its own
                self._forget(conn)
        conn = self._connect()
        with self._lock:
            self._open.append((pid, conn))
            self._local.held = (pid, self._generation, conn)
        return conn

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                str(self.path),
                timeout=self.busy_timeout,
                isolation_level=None,  # autocommit; transactions are explicit BEGIN IMMEDIATE
                check_same_thread=False,  # close() may run in another thread
            )
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous=NORMAL")
            if self._schema_pid != os.getpid():
                self._ensure_schema(conn)
                self._schema_pid = os.getpid()
        except (OSError, sqlite3.Error) as exc:
            raise BrokerError(
                f"cannot open the sqlite broker file {self.path}: {exc}; check that the directory "
                "is writable, or choose another file with sqlite:///path/to/file.db"
            ) from exc
        if str(mode).lower() != "wal":
            log.warning(
                "sqlite broker file %s is in %s journal mode, not WAL (is it on a network file "
                "system?): concurrent workers will block each other",
                self.path,
                mode,
            )
        return conn

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigurationError(
                f"{self.path} was created by a newer millpond (schema {version}, this one knows "
                f"{SCHEMA_VERSION}); upgrade millpond or use another file"
            )
        if version < SCHEMA_VERSION:
            try:
                schema = f"{_SCHEMA}; {exchanges.SCHEMA}"
                conn.executescript(
                    f"BEGIN IMMEDIATE; {schema}; PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                )
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A short write transaction that takes the lock at once (no upgrade deadlocks)."""
        conn = self.conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        """Close this process's connections; threads open fresh ones if used again.

        The calling thread's connection closes now; every other thread's closes in that thread,
        when it next asks for one (or when it ends): closing a connection another thread may be
        using at that very moment can crash the interpreter inside SQLite.
        """
        with self._lock:
            self._generation += 1
        held = getattr(self._local, "held", None)
        if held is not None and held[0] == os.getpid():
            self._local.held = None
            self._forget(held[2])

    def _forget(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            self._open = [(owner, c) for owner, c in self._open if c is not conn]
        try:
            conn.close()
        except sqlite3.Error:
            pass

    def close_thread(self) -> None:
        """Close the calling thread's connection (used by helper threads as they end)."""
        held = getattr(self._local, "held", None)
        if held is None or held[0] != os.getpid():
            return
        self._local.held = None
        with self._lock:
            self._open = [(o, c) for o, c in self._open if c is not held[2]]
        try:
            held[2].close()
        except sqlite3.Error:
            pass


def _marks(count: int) -> str:
    return ",".join("?" * count)


# -- the broker ------------------------------------------------------------------------------------


class SqliteBroker(Broker):
    """Queues in one SQLite file, shared by every process on this machine that opens it."""

    system: ClassVar[str] = "sqlite"
    #: exchanges between the processes of this machine (remote control and events)
    supports_broadcast: ClassVar[bool] = True

    def __init__(self, url: str = "sqlite://", options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self.path, self.settings = parse_url(url, self.options)
        self.db = _Database(self.path, self.settings.busy_timeout)
        self._next_reap = 0.0
        self._consumers: weakref.WeakSet[SqliteConsumer] = weakref.WeakSet()
        self._backend: SqliteResultBackend | None = None

    def connect(self) -> None:
        with _translate("connect", self.path):
            self.db.conn()

    def close(self) -> None:
        """Close every consumer of this broker (their messages go back) and the connections."""
        for consumer in list(self._consumers):
            consumer.close()
        if self._backend is not None:
            self._backend.close()
        self.db.close()

    def declare(self, queues: Iterable[str]) -> None:
        """Queues are implicit in SQLite; this checks the names and opens the file."""
        for queue in queues:
            exchanges.check_queue(queue)
        self.connect()

    def broadcast(
        self,
        exchange: Exchange,
        message: Message,
        routing_key: str = "",
        *,
        ttl: float | None = None,
    ) -> int:
        return exchanges.sqlite_broadcast(self, exchange, message, routing_key, ttl)

    def listen(self, spec: Listen) -> exchanges.SqliteSubscription:
        return exchanges.SqliteSubscription(self, spec)

    def publish(self, queue: str, message: Message, *, eta: float | None = None) -> None:
        exchanges.check_queue(queue)
        try:
            text = envelope.dumps(message, queue=queue)
        except (TypeError, ValueError) as exc:
            raise PublishError(
                f"message {message.task_id or '(no id)'} cannot be stored: {exc}; headers and "
                "properties must be JSON-compatible"
            ) from exc
        now = time.time()
        try:
            with _translate(f"publish to {queue!r}", self.path, PublishError):
                self.db.conn().execute(
                    "INSERT INTO messages (queue, eta, envelope) VALUES (?, ?, ?)",
                    (queue, eta if eta is not None and eta > now else now, text),
                )
        except PublishError:
            raise
        except BrokerError as exc:
            raise PublishError(f"message {message.task_id or '(no id)'} not published: {exc}")
        self.maybe_reap()

    def consumer(self, queues: Sequence[str], prefetch: int) -> SqliteConsumer:
        consumer = SqliteConsumer(self, [exchanges.check_queue(q) for q in queues], prefetch)
        self._consumers.add(consumer)
        return consumer

    def purge(self, queue: str) -> int:
        """Delete the queue's waiting messages, delayed ones included (not the ones held)."""
        with _translate(f"purge {queue!r}", self.path):
            cur = self.db.conn().execute(
                "DELETE FROM messages WHERE queue = ? AND consumer IS NULL", (queue,)
            )
        return cur.rowcount

    def queue_length(self, queue: str) -> int:
        with _translate(f"count {queue!r}", self.path):
            row = (
                self.db.conn()
                .execute(
                    "SELECT COUNT(*) FROM messages WHERE queue = ? AND consumer IS NULL "
                    "AND eta <= ?",
                    (queue, time.time()),
                )
                .fetchone()
            )
        return int(row[0])

    def dead_letters(self, queue: str, limit: int = 100) -> list[Message]:
        with _translate(f"list the dead letters of {queue!r}", self.path):
            rows = (
                self.db.conn()
                .execute(
                    "SELECT id, envelope FROM messages WHERE queue = ? ORDER BY eta, id LIMIT ?",
                    (dead_letter_queue(queue), limit),
                )
                .fetchall()
            )
        return [_load(row_id, text)[0] for row_id, text in rows]

    def replay_dead_letters(self, queue: str, limit: int | None = None) -> int:
        """Move dead letters back, oldest first, as fresh messages (count reset, reason removed)."""
        now = time.time()
        with _translate(f"replay the dead letters of {queue!r}", self.path), self.db.write() as c:
            rows = c.execute(
                "SELECT id, envelope FROM messages WHERE queue = ? AND consumer IS NULL "
                "ORDER BY eta, id LIMIT ?",
                (dead_letter_queue(queue), -1 if limit is None else limit),
            ).fetchall()
            for row_id, text in rows:
                message, _ = _load(row_id, text)
                message.headers.pop(DEATH_REASON, None)
                c.execute(
                    "UPDATE messages SET queue = ?, eta = ?, deliveries = 0, envelope = ? "
                    "WHERE id = ?",
                    (queue, now, envelope.dumps(message, queue=queue), row_id),
                )
        return len(rows)

    def claims(self) -> SqliteClaims:
        """Leases and state in this file (see `millpond.contracts.broker.Claims`)."""
        return SqliteClaims(self.db)

    def default_backend(self) -> SqliteResultBackend:
        if self._backend is None:
            self._backend = SqliteResultBackend(self.url, self.options)
        return self._backend

    # -- leases ------------------------------------------------------------------------------------

    def maybe_reap(self) -> int:
        """Reap dead consumers if this process has not looked for a while (cheap otherwise)."""
        now = time.monotonic()
        if now < self._next_reap:
            return 0
        self._next_reap = now + self.settings.reap_interval
        try:
            return self.reap()
        except (BrokerError, sqlite3.Error) as exc:
            log.warning("sqlite broker %s: looking for dead consumers failed: %s", self.path, exc)
            return 0

    def reap(self) -> int:
        """Give the messages of consumers whose lease expired back to their queues.

        Returns how many messages went back. A read decides whether there is anything to do, so
        the common case takes no write lock.
        """
        now = time.time()
        with _translate("look for dead consumers", self.path):
            conn = self.db.conn()
            expired = conn.execute(
                "SELECT 1 FROM consumers WHERE expires < ? LIMIT 1", (now,)
            ).fetchone()
            orphaned = conn.execute(
                "SELECT 1 FROM messages WHERE consumer IS NOT NULL "
                "AND consumer NOT IN (SELECT id FROM consumers) LIMIT 1"
            ).fetchone()
            if expired is None and orphaned is None:
                return 0
            returned = 0
            with self.db.write() as c:
                dead = c.execute(
                    "SELECT id, pid, host, heartbeat FROM consumers WHERE expires < ?", (now,)
                ).fetchall()
                for consumer_id, pid, host, heartbeat in dead:
                    count = c.execute(
                        "UPDATE messages SET consumer = NULL WHERE consumer = ?", (consumer_id,)
                    ).rowcount
                    c.execute("DELETE FROM consumers WHERE id = ?", (consumer_id,))
                    returned += count
                    log.warning(
                        "sqlite broker %s: consumer %s (pid %s on %s) sent no heartbeat for "
                        "%.1f s; %d message(s) it held go back to their queues",
                        self.path,
                        consumer_id,
                        pid,
                        host,
                        now - heartbeat,
                        count,
                    )
                returned += c.execute(
                    "UPDATE messages SET consumer = NULL WHERE consumer IS NOT NULL "
                    "AND consumer NOT IN (SELECT id FROM consumers)"
                ).rowcount
        return returned


def _load(row_id: int, text: str) -> tuple[Message, str | None]:
    """The stored message, or a stand-in carrying the raw text and why it could not be read."""
    try:
        return envelope.loads(text), None
    except MalformedMessage as exc:
        reason = f"stored envelope of message row {row_id} is unreadable: {exc}"
        stand_in = Message(
            body=text.encode("utf-8", "surrogateescape"),
            headers={DEATH_REASON: reason},
            content_type="application/octet-stream",
            content_encoding="binary",
        )
        return stand_in, reason


class SqliteConsumer(Consumer):
    """Reserves rows under a lease that its own heartbeat thread keeps alive."""

    def __init__(self, broker: SqliteBroker, queues: list[str], prefetch: int) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        if not queues:
            raise ValueError("a consumer needs at least one queue")
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._broker = broker
        self._db = broker.db
        self._settings = broker.settings
        self._queues = queues
        self._prefetch = prefetch
        self._held: dict[int, str] = {}
        #: rows held when this consumer's lease lapsed: another consumer may have them now
        self._lost: set[int] = set()
        #: until when the lease written last holds (wall clock, as the table's `expires`)
        self._lease_until = time.time() + broker.settings.lease_timeout
        self._closed = False
        self._healthy = True
        self._stop = threading.Event()
        # Only "?" placeholders are formatted into these statements, never values.
        ready = f"consumer IS NULL AND queue IN ({_marks(len(queues))}) AND eta <= ?"
        self._ready_sql = f"SELECT 1 FROM messages WHERE {ready} LIMIT 1"  # noqa: S608
        pick = f"SELECT id FROM messages WHERE {ready} ORDER BY eta, id LIMIT ?"  # noqa: S608
        returning = "RETURNING id, queue, eta, deliveries, envelope"
        take = "SET consumer = ?, deliveries = deliveries + 1"
        self._reserve_sql = f"UPDATE messages {take} WHERE id IN ({pick}) {returning}"
        with _translate("register a consumer", broker.path):
            self._register(self._db.conn())
        self._beat = threading.Thread(
            target=self._heartbeat_loop, name=f"millpond-sqlite-heartbeat-{self.id}", daemon=True
        )
        self._beat.start()

    # -- lease ------------------------------------------------------------------------------------

    def _register(self, conn: sqlite3.Connection) -> None:
        now = time.time()
        self._lease_until = now + self._settings.lease_timeout
        conn.execute(
            "INSERT OR REPLACE INTO consumers (id, pid, host, queues, started, heartbeat, expires) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                self.id,
                os.getpid(),
                socket.gethostname(),
                json.dumps(self._queues),
                now,
                now,
                now + self._settings.lease_timeout,
            ),
        )

    def _renew(self, conn: sqlite3.Connection) -> None:
        """Extend the lease; re-register if another process declared this consumer dead."""
        now = time.time()
        renewed = conn.execute(
            "UPDATE consumers SET heartbeat = ?, expires = ? WHERE id = ?",
            (now, now + self._settings.lease_timeout, self.id),
        ).rowcount
        if not renewed or now > self._lease_until:
            self._lost.update(list(self._held))  # fetched under the lapsed lease
        if renewed:
            self._lease_until = now + self._settings.lease_timeout
        if not renewed:
            log.warning(
                "sqlite consumer %s lost its lease (no heartbeat for more than %.1f s: was the "
                "process suspended?); the messages it held went back to their queues and may "
                "run twice",
                self.id,
                self._settings.lease_timeout,
            )
            self._register(conn)

    def _heartbeat_loop(self) -> None:
        failing_since: float | None = None
        try:
            while not self._stop.wait(self._settings.heartbeat_interval):
                try:
                    with _translate("renew a consumer lease", self._broker.path):
                        self._renew(self._db.conn())
                    self._broker.maybe_reap()
                    failing_since = None
                    self._healthy = True
                except BrokerError as exc:
                    self._healthy = False
                    if failing_since is None:
                        failing_since = time.monotonic()
                        log.warning("sqlite consumer %s: heartbeat failed: %s", self.id, exc)
        finally:
            self._db.close_thread()

    def stale(self, delivery: Delivery) -> bool:
        """Held under a lease that lapsed since (told by the clock, or by the heartbeat finding
        this consumer reaped): the row may be another consumer's now."""
        if time.time() > self._lease_until:
            self._lost.update(list(self._held))
        return delivery.tag in self._lost

    @property
    def connected(self) -> bool:
        """False while the heartbeat cannot write to the file (the lease is at risk)."""
        return self._healthy and not self._closed

    # -- consuming --------------------------------------------------------------------------------

    def resize(self, prefetch: int) -> bool:
        """The prefetch limit is counted here: a new one applies from the next fetch."""
        if prefetch < 1:
            return False
        self._prefetch = prefetch
        return True

    def fetch(self, max_count: int, timeout: float, waker: Waker | None = None) -> list[Delivery]:
        if self._closed:
            raise RuntimeError(
                "fetch() on a closed consumer; open a new one with broker.consumer()"
            )
        deadline = time.monotonic() + timeout
        pause = 0.001
        while True:
            room = min(max_count, self._prefetch - len(self._held))
            if room > 0:
                got = self._reserve(room)
                if got:
                    return got
                self._broker.maybe_reap()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            # With the prefetch window full nothing can arrive until an ack: sleep it out.
            wait = min(pause, remaining) if room > 0 else remaining
            if waker is not None:
                if waker.wait(wait):
                    return []
            else:
                time.sleep(wait)
            pause = min(pause * 2, 0.025)

    def _reserve(self, room: int) -> list[Delivery]:
        now = time.time()
        with _translate("fetch", self._broker.path):
            conn = self._db.conn()
            if conn.execute(self._ready_sql, (*self._queues, now)).fetchone() is None:
                return []
            with self._db.write() as c:
                self._renew(c)
                rows = c.execute(self._reserve_sql, (self.id, *self._queues, now, room)).fetchall()
        rows.sort(key=lambda r: (r[2], r[0]))
        out: list[Delivery] = []
        for row_id, queue, _, deliveries, text in rows:
            message, problem = _load(row_id, text)
            if problem is not None:
                self._held[row_id] = queue
                log.error("sqlite broker %s: %s; dead-lettering it", self._broker.path, problem)
                self._dead_letter(row_id, queue, message)
                continue
            self._held[row_id] = queue
            out.append(
                Delivery(
                    message=message,
                    queue=queue,
                    tag=row_id,
                    redelivered=deliveries > 1,
                    delivery_count=deliveries,
                )
            )
        return out

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        tags = [d.tag for d in deliveries if self._held.pop(d.tag, None) is not None]
        self._lost.difference_update(tags)
        gone = 0
        with _translate("acknowledge", self._broker.path):
            conn = self._db.conn()
            for start in range(0, len(tags), 500):
                chunk = tags[start : start + 500]
                in_chunk = f"id IN ({_marks(len(chunk))})"
                gone += conn.execute(
                    f"DELETE FROM messages WHERE {in_chunk} AND (consumer = ? OR consumer IS NULL)",  # noqa: S608
                    (*chunk, self.id),
                ).rowcount
        if gone < len(tags):
            log.warning(
                "sqlite consumer %s: %d acknowledged message(s) were already handed to another "
                "consumer after this one lost its lease; they may run twice",
                self.id,
                len(tags) - gone,
            )

    def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        queue = self._held.get(delivery.tag)
        self._lost.discard(delivery.tag)
        if queue is None:
            return  # already acked, rejected or given back by close()
        if requeue:
            del self._held[delivery.tag]
            with _translate("requeue", self._broker.path):
                self._db.conn().execute(
                    "UPDATE messages SET consumer = NULL WHERE id = ? AND consumer = ?",
                    (delivery.tag, self.id),
                )
            return
        with _translate("read a message to dead-letter", self._broker.path):
            row = (
                self._db.conn()
                .execute(
                    "SELECT envelope FROM messages WHERE id = ? AND consumer = ?",
                    (delivery.tag, self.id),
                )
                .fetchone()
            )
        if row is None:
            del self._held[delivery.tag]
            return  # the lease was lost and the message handed to another consumer
        message, _ = _load(delivery.tag, row[0])
        message.headers[DEATH_REASON] = reason
        self._dead_letter(delivery.tag, queue, message)

    def _dead_letter(self, row_id: int, queue: str, message: Message) -> None:
        dead = dead_letter_queue(queue)
        with _translate(f"dead-letter a message to {dead!r}", self._broker.path):
            self._db.conn().execute(
                "UPDATE messages SET queue = ?, consumer = NULL, eta = ?, envelope = ? "
                "WHERE id = ? AND consumer = ?",
                (dead, time.time(), envelope.dumps(message, queue=dead), row_id, self.id),
            )
        self._held.pop(row_id, None)

    def close(self) -> None:
        """Stop the heartbeat, give back every unacked message and deregister."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._beat is not threading.current_thread():
            self._beat.join(self._settings.heartbeat_interval + self._settings.busy_timeout + 1)
        with _translate("close a consumer", self._broker.path), self._db.write() as c:
            c.execute("UPDATE messages SET consumer = NULL WHERE consumer = ?", (self.id,))
            c.execute("DELETE FROM consumers WHERE id = ?", (self.id,))
        self._held.clear()


# -- results ---------------------------------------------------------------------------------------

#: in-process wake-ups for result waiters, by database file (other processes are polled)
_result_signals: dict[Path, threading.Condition] = {}
_signals_lock = threading.Lock()


def _signal_for(path: Path) -> threading.Condition:
    with _signals_lock:
        found = _result_signals.get(path)
        if found is None:
            found = _result_signals[path] = threading.Condition()
        return found


class SqliteResultBackend(ResultBackend):
    """Results in the same file as the broker, kept for `result_expires` seconds.

    There is no cross-process notification in SQLite, so `get()` polls every 5 to 20 ms (a
    store in the same process wakes it at once).
    """

    #: how often a backend deletes expired results (seconds)
    sweep_interval: ClassVar[float] = 60.0

    def __init__(self, url: str = "sqlite://", options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self.path, self.settings = parse_url(url, self.options)
        self.db = _Database(self.path, self.settings.busy_timeout)
        self._signal = _signal_for(self.path)
        self._next_sweep = 0.0

    def store(self, meta: ResultMeta) -> None:
        text = json.dumps(meta.to_json(), separators=(",", ":"))  # not JSON: TypeError (contract)
        now = time.time()
        with _translate(f"store the result of {meta.task_id}", self.path, BackendError):
            conn = self.db.conn()
            conn.execute(
                "INSERT OR REPLACE INTO results (task_id, status, meta, stored, expires) "
                "VALUES (?, ?, ?, ?, ?)",
                (meta.task_id, meta.status, text, now, now + self.settings.result_expires),
            )
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + self.sweep_interval
                conn.execute("DELETE FROM results WHERE expires < ?", (now,))
        with self._signal:
            self._signal.notify_all()

    def peek(self, task_id: str) -> ResultMeta | None:
        with _translate(f"read the result of {task_id}", self.path, BackendError):
            row = (
                self.db.conn()
                .execute(
                    "SELECT meta FROM results WHERE task_id = ? AND expires >= ?",
                    (task_id, time.time()),
                )
                .fetchone()
            )
        if row is None:
            return None
        try:
            return ResultMeta.from_json(json.loads(row[0]))
        except (ValueError, TypeError, AttributeError) as exc:
            raise BackendError(
                f"the stored result of task {task_id} in {self.path} is unreadable: {exc}; "
                "forget it and run the task again"
            ) from exc

    def get(self, task_id: str, timeout: float | None) -> ResultMeta | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.005
        while True:
            meta = self.peek(task_id)
            if meta is not None and meta.status in READY_STATES:
                return meta
            wait = pause
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return meta
                wait = min(wait, remaining)
            with self._signal:
                self._signal.wait(wait)
            pause = min(pause * 2, 0.02)

    def forget(self, task_id: str) -> None:
        with _translate(f"forget the result of {task_id}", self.path, BackendError):
            self.db.conn().execute("DELETE FROM results WHERE task_id = ?", (task_id,))

    # -- chords and groups: each step one write transaction, so a join completes once -------------
    supports_chords = True

    def set_chord_size(self, group_id: str, size: int) -> None:
        now = time.time()
        with (
            _translate(f"start the chord {group_id}", self.path, BackendError),
            self.db.write() as c,
        ):
            c.execute("DELETE FROM chord_parts WHERE group_id = ?", (group_id,))
            c.execute(
                "INSERT OR REPLACE INTO chords (group_id, size, claimed_until, done, expires) "
                "VALUES (?, ?, 0, 0, ?)",
                (group_id, size, now + self.settings.result_expires),
            )
            c.execute("DELETE FROM chords WHERE expires < ?", (now,))

    def chord_part_return(
        self, group_id: str, task_id: str, index: int | None, state: str, result: Any
    ) -> list[ChordPart] | None:
        text = json.dumps(result, separators=(",", ":"))
        order = float(index) if index is not None else 1e300  # no index: after the indexed
        now = time.time()
        with (
            _translate(f"join the chord {group_id}", self.path, BackendError),
            self.db.write() as c,
        ):
            row = c.execute(
                "SELECT size, claimed_until, done FROM chords WHERE group_id = ?", (group_id,)
            ).fetchone()
            if row is None or row[2]:
                return None
            size, claimed_until = int(row[0]), float(row[1])
            c.execute(
                "INSERT OR IGNORE INTO chord_parts (group_id, task_id, idx, state, result) "
                "VALUES (?, ?, ?, ?, ?)",
                (group_id, task_id, order, state, text),
            )
            count = c.execute(
                "SELECT COUNT(*) FROM chord_parts WHERE group_id = ?", (group_id,)
            ).fetchone()[0]
            if count < size or claimed_until > now:
                return None
            c.execute(
                "UPDATE chords SET claimed_until = ? WHERE group_id = ?",
                (now + CHORD_CLAIM_TTL, group_id),
            )
            parts = c.execute(
                "SELECT task_id, state, result FROM chord_parts WHERE group_id = ? ORDER BY idx",
                (group_id,),
            ).fetchall()
        return [(tid, st, json.loads(res)) for tid, st, res in parts]

    def chord_done(self, group_id: str) -> None:
        with _translate(f"end the chord {group_id}", self.path, BackendError), self.db.write() as c:
            c.execute("UPDATE chords SET done = 1 WHERE group_id = ?", (group_id,))
            c.execute("DELETE FROM chord_parts WHERE group_id = ?", (group_id,))

    def chord_claim_expires(self, group_id: str) -> float | None:
        with _translate(f"read the chord {group_id}", self.path, BackendError):
            row = (
                self.db.conn()
                .execute("SELECT claimed_until, done FROM chords WHERE group_id = ?", (group_id,))
                .fetchone()
            )
        if row is None or row[1] or float(row[0]) <= time.time():
            return None
        return float(row[0])

    def chord_release(self, group_id: str) -> None:
        with _translate(f"release the chord {group_id}", self.path, BackendError):
            self.db.conn().execute(
                "UPDATE chords SET claimed_until = 0 WHERE group_id = ?", (group_id,)
            )

    def save_group(self, group_id: str, value: Any) -> None:
        with _translate(f"save the group {group_id}", self.path, BackendError):
            self.db.conn().execute(
                "INSERT OR REPLACE INTO saved_groups (group_id, value, expires) VALUES (?, ?, ?)",
                (group_id, json.dumps(value), time.time() + self.settings.result_expires),
            )

    def restore_group(self, group_id: str) -> Any:
        with _translate(f"restore the group {group_id}", self.path, BackendError):
            row = (
                self.db.conn()
                .execute(
                    "SELECT value FROM saved_groups WHERE group_id = ? AND expires >= ?",
                    (group_id, time.time()),
                )
                .fetchone()
            )
        return json.loads(row[0]) if row is not None else None

    def forget_group(self, group_id: str) -> None:
        with _translate(f"forget the group {group_id}", self.path, BackendError):
            self.db.conn().execute("DELETE FROM saved_groups WHERE group_id = ?", (group_id,))

    def close(self) -> None:
        self.db.close()


# -- claims ----------------------------------------------------------------------------------------


class SqliteClaims(Claims):
    """A claim is a row with its owner and expiry, taken in one `BEGIN IMMEDIATE` transaction:
    the write lock makes "free or mine, then mine" atomic across every process on the machine.
    Expiry is the wall clock of the processes sharing the file (one machine: one clock)."""

    def __init__(self, db: _Database) -> None:
        self.db = db
        #: expired rows are deleted at most once a minute, by whichever claim comes next
        self._next_sweep = 0.0

    def acquire(self, key: str, owner: str, ttl: float) -> bool:
        now = time.time()
        with _translate(f"claim {key!r}", self.db.path), self.db.write() as conn:
            row = conn.execute("SELECT owner, expires FROM claims WHERE key = ?", (key,)).fetchone()
            if row is not None and row[0] != owner and row[1] > now:
                return False
            conn.execute(
                "INSERT INTO claims (key, owner, expires) VALUES (?, ?, ?) ON CONFLICT (key) "
                "DO UPDATE SET owner = excluded.owner, expires = excluded.expires",
                (key, owner, now + ttl),
            )
            if now >= self._next_sweep:
                conn.execute("DELETE FROM claims WHERE expires < ?", (now,))
                self._next_sweep = now + 60.0
        return True

    def release(self, key: str, owner: str) -> None:
        with _translate(f"release {key!r}", self.db.path), self.db.write() as conn:
            conn.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, owner))

    def holder(self, key: str) -> Holder | None:
        with _translate(f"read {key!r}", self.db.path):
            row = (
                self.db.conn()
                .execute("SELECT owner, expires FROM claims WHERE key = ?", (key,))
                .fetchone()
            )
        now = time.time()
        if row is None or row[1] <= now:
            return None
        return Holder(str(row[0]), float(row[1]) - now)

    def load_state(self, namespace: str) -> dict[str, str]:
        with _translate(f"read {namespace!r}", self.db.path):
            rows = (
                self.db.conn()
                .execute("SELECT field, value FROM state WHERE namespace = ?", (namespace,))
                .fetchall()
            )
        return {str(f): str(v) for f, v in rows}

    def save_state(self, namespace: str, values: Mapping[str, str]) -> None:
        if not values:
            return
        with _translate(f"write {namespace!r}", self.db.path), self.db.write() as conn:
            conn.executemany(
                "INSERT INTO state (namespace, field, value) VALUES (?, ?, ?) ON CONFLICT "
                "(namespace, field) DO UPDATE SET value = excluded.value",
                [(namespace, k, v) for k, v in values.items()],
            )
