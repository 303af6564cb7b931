"""The Postgres consumer: one statement per fetched batch, LISTEN wake-ups, leases.

A fetch is one `UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED LIMIT n)`: it reserves up to the
free part of the prefetch window (capped by `fetch_batch`) by writing this consumer's id into the
rows and counting the delivery, so a message is always either ready or held by a named consumer.
`ack` is one DELETE for the whole batch, and it travels with the next fetch: the worker loop acks
what finished and fetches right after, so both statements go in one pipelined round trip. An ack
waits no longer than that, or than the next `ack` `ACK_DELAY` seconds later, or than `close()`.

When nothing is ready the consumer sleeps in `select()` on two sockets: its connection, which
LISTENs on one channel per queue (notified by the table's trigger when messages become ready), and the
worker's `Waker` (a completion arrived: acks must go out now). It also wakes when the earliest
delayed message of its queues is due, and after `idle_timeout` to check the connection.

Two connections per consumer, each with one owner: the loop's (LISTEN, fetch, ack, reject) and the
lease keeper's (`millpond.contracts.lease`).

Connection trouble never crashes the worker loop: a failed fetch logs, waits a little (woken
early by the waker) and returns nothing; the next call reconnects. Acks and rejects that cannot
reach the server are kept and sent again before the next fetch. A fetch whose reply was lost may
have reserved messages this consumer never saw: they are given back, uncounted, as soon as the
server answers again.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from millpond.contracts.broker import Consumer, Delivery, dead_letter_queue
from millpond.contracts.lease import BeatResult, LeaseKeeper, Outage
from millpond.contracts.waking import Waker
from millpond_broker_postgres import schema
from millpond_broker_postgres.connection import RETRYABLE, close_quietly, connect
from millpond_broker_postgres.store import message_of

if TYPE_CHECKING:
    from millpond_broker_postgres.broker import PostgresBroker

log = logging.getLogger("millpond.broker.postgres")

Conn = psycopg.Connection[tuple[Any, ...]]
#: an ack kept for the next fetch is sent on its own by an `ack` call this much later
ACK_DELAY = 0.05


def consumer_id() -> str:
    """Readable and unique: `SELECT * FROM millpond.consumers` shows which host holds what."""
    return f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:12]}"


class PostgresConsumer(Consumer):
    def __init__(self, broker: PostgresBroker, queues: Sequence[str], prefetch: int) -> None:
        if isinstance(queues, str):
            queues = [queues]
        if not queues:
            raise ValueError("a consumer needs at least one queue")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 (0 means no limit), got {prefetch}")
        self._cfg = broker.cfg
        self._sql = broker.sql
        self.queues = list(dict.fromkeys(queues))
        self.prefetch = prefetch
        self.id = consumer_id()
        self._held: set[int] = set()
        #: acknowledged tags not sent yet (they go with the next fetch), and since when
        self._acks: list[int] = []
        self._acks_since = 0.0
        self._pending: list[tuple[str, Callable[[Conn], Any]]] = []
        self._uncertain = False
        self._outage = Outage("postgres", self._cfg.masked_url)
        self._closed = False
        self._conn: Conn | None = None
        #: a notification arrived (read by psycopg during a statement, or by `_drain`)
        self._rung = False
        self._beat_conn: Conn | None = None
        self._heartbeat = LeaseKeeper(
            self._beat,
            self._cfg.heartbeat_interval,
            "postgres",
            self._cfg.masked_url,
            (psycopg.Error,),
        )
        self._heartbeat.beat_once()  # the lease exists before the first message is reserved
        self._heartbeat.start()

    # -- connections -----------------------------------------------------------------------------
    def _main(self) -> Conn:
        """The loop's connection, (re)made with every channel listened to before it is used, so
        a message committed after this returns always notifies it. Fetches run on the same
        connection: the server process that sent the notification is the one that runs the
        fetch, already awake (one process hop fewer per wake-up than a separate listener)."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            close_quietly(self._conn)
            self._conn = None
            conn = connect(self._cfg, "consumer")
            try:
                for queue in self.queues:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(schema.channel(queue))))
            except BaseException:
                close_quietly(conn)
                raise
            # notifications that arrive while a statement runs are read by psycopg then
            conn.add_notify_handler(self._notified)
            self._conn = conn
        return self._conn

    def _notified(self, _notify: psycopg.Notify) -> None:
        self._rung = True

    def _drop(self) -> None:
        """Forget a broken connection (the next use opens a new one)."""
        close_quietly(self._conn)
        self._conn = None

    # -- lease -----------------------------------------------------------------------------------
    def _beat(self) -> BeatResult:
        if self._beat_conn is None or self._beat_conn.closed or self._beat_conn.broken:
            close_quietly(self._beat_conn)
            self._beat_conn = connect(self._cfg, "lease")
        conn = self._beat_conn
        try:
            row = conn.execute(
                self._sql.beat, [self.id, self.queues, float(self._cfg.lease_timeout)]
            ).fetchone()
            counted = conn.execute(self._sql.restore).fetchone()
            restored = int(counted[0]) if counted else 0
        except psycopg.Error:
            if conn.broken:
                close_quietly(conn)
                self._beat_conn = None
            raise
        return BeatResult(lapsed=bool(row and row[0]), restored=max(0, restored))

    # -- fetching --------------------------------------------------------------------------------
    def _room(self, max_count: int) -> int:
        room = min(max_count, self._cfg.fetch_batch)
        if self.prefetch:
            room = min(room, self.prefetch - len(self._held))
        return room

    def fetch(self, max_count: int, timeout: float, waker: Waker | None = None) -> list[Delivery]:
        if self._closed:
            raise RuntimeError("fetch() on a closed consumer; create a new one")
        deadline = time.monotonic() + max(timeout, 0.0)
        if not self._settle():
            self._outage.pause(deadline, waker)
            return []
        while True:
            room = self._room(max_count)
            if room <= 0:  # prefetch window full: only a completion (the waker) helps
                self._flush_acks()
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    if waker is not None:
                        waker.wait(remaining)
                    else:
                        time.sleep(remaining)
                return []
            try:
                conn = self._main()
                self._drain(conn)
                deliveries, due = self._reserve(room)
            except psycopg.Error as exc:  # never crash the worker loop: report, wait, retry
                self._trouble("fetch", exc)
                self._outage.pause(deadline, waker)
                return []
            try:
                # a notification read during those statements, or buffered behind their replies,
                # may announce a message committed after the fetch's snapshot: fetch again
                rung = self._drain(conn)
            except psycopg.Error as exc:
                self._trouble("fetch", exc)
                if deliveries:  # reserved and held: the worker must get them, or they would
                    return deliveries  # stay leased to this live consumer and never run
                self._outage.pause(deadline, waker)
                return []
            self._outage.over()
            if deliveries:
                return deliveries
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            if rung:
                continue
            wait = min(remaining, self._cfg.idle_timeout)
            if due is not None:
                wait = min(wait, max(due, 0.0))
            if waker is not None and waker.is_set:
                return []
            fds: list[Any] = [conn.fileno()]
            if waker is not None:
                fds.append(waker)
            try:
                ready, _, _ = select.select(fds, [], [], wait)
            except (OSError, ValueError):
                return []
            if waker is not None and waker in ready:
                return []
            if not ready and time.monotonic() >= deadline:
                return []

    def _drain(self, conn: Conn) -> bool:
        """Read what the socket holds and discard the notifications (they only wake us);
        whether any arrived since the last call."""
        pgconn = conn.pgconn
        pgconn.consume_input()
        if pgconn.status != psycopg.pq.ConnStatus.OK:
            raise psycopg.OperationalError("the connection was closed by the server")
        while pgconn.notifies() is not None:
            self._rung = True
        rung, self._rung = self._rung, False
        return rung

    def _reserve(self, room: int) -> tuple[list[Delivery], float | None]:
        """Up to `room` deliveries; with none, the seconds until the earliest delayed message
        of these queues is due (None: there is none). Kept acks go in the same round trip."""
        params = {"queues": self.queues, "n": room, "me": self.id}
        conn = self._main()
        acks, self._acks = self._acks, []
        try:
            if acks:
                with conn.pipeline():
                    acked = conn.execute(self._sql.ack, [acks, self.id])
                    cursor = conn.execute(self._sql.fetch, params)
                self._acked(acked.rowcount, len(acks))
            else:
                cursor = conn.execute(self._sql.fetch, params)
            rows = cursor.fetchall()
        except RETRYABLE:
            # both may have run and the reply been lost: the fetch may have reserved messages
            # (given back later), and the acks are sent again (deleting twice is harmless)
            self._acks = acks + self._acks
            self._uncertain = True
            raise
        except psycopg.Error:
            if acks:  # sent on their own next time, so a refusal of one blocks neither
                self._pending.append((f"ack of {len(acks)} message(s)", self._ack_op(acks)))
            raise
        out: list[Delivery] = []
        for row in rows:
            if row[0] is None:  # the "nothing reserved" row
                return out, None if row[-1] is None else float(row[-1])
            tag, queue, count = int(row[0]), str(row[1]), int(row[2])
            out.append(Delivery(message_of(row[3:-1]), queue, tag, count > 1, count))
            self._held.add(tag)
        return out, None

    # -- acknowledging ---------------------------------------------------------------------------
    def ack(self, deliveries: Sequence[Delivery]) -> None:
        tags = [int(d.tag) for d in deliveries]
        if not tags:
            return
        self._held.difference_update(tags)
        now = time.monotonic()
        if not self._acks:
            self._acks_since = now
        self._acks.extend(tags)
        if now - self._acks_since >= ACK_DELAY:  # no fetch came for them: send them now
            self._flush_acks()

    def _flush_acks(self) -> None:
        if self._acks:
            acks, self._acks = self._acks, []
            self._run(f"ack of {len(acks)} message(s)", self._ack_op(acks))

    def _ack_op(self, tags: list[int]) -> Callable[[Conn], None]:
        def op(c: Conn) -> None:
            self._acked(c.execute(self._sql.ack, [tags, self.id]).rowcount, len(tags))

        return op

    def _acked(self, removed: int, asked: int) -> None:
        if removed < asked:
            log.warning(
                "postgres: %d of %d acknowledged message(s) were no longer held by this "
                "consumer (its lease lapsed and they went back to the queue); they may run again",
                asked - removed,
                asked,
            )

    def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        tag = int(delivery.tag)
        self._held.discard(tag)
        if requeue:
            self._run("requeue", lambda c: c.execute(self._sql.requeue, [tag, self.id]))
            return
        dead = dead_letter_queue(delivery.queue)

        def move(c: Conn) -> None:
            moved = c.execute(self._sql.dead_letter, [dead, reason, tag, self.id]).fetchone()
            if not moved or not moved[0]:
                log.warning(
                    "postgres: a message of %r was not dead-lettered: this consumer no longer "
                    "held it (its lease lapsed and it went back to the queue)",
                    delivery.queue,
                )

        self._run("dead-lettering", move)

    # -- connection trouble ----------------------------------------------------------------------
    def _run(self, what: str, op: Callable[[Conn], Any]) -> None:
        """Run `op` now, or keep it for the next call if the server cannot be reached."""
        if self._pending:
            self._settle()
        if self._pending:
            self._pending.append((what, op))
            return
        try:
            op(self._main())
        except RETRYABLE as exc:
            self._pending.append((what, op))
            self._trouble(what, exc)
        except psycopg.Error as exc:
            self._outage.refused(what, exc)
        else:
            self._outage.over()

    def _settle(self) -> bool:
        """Send what is owed (kept acks, rejects, lost reservations); False if the server is away."""
        try:
            conn = self._main()
            while self._pending:
                what, op = self._pending[0]
                try:
                    op(conn)
                except RETRYABLE:
                    raise
                except psycopg.Error as exc:
                    self._outage.refused(what, exc)
                self._pending.pop(0)
            if self._uncertain:
                # what this consumer holds or has acknowledged without the ack reaching the
                # server is known; only the rest was reserved by a fetch whose reply was lost
                known = sorted(self._held.union(self._acks))
                conn.execute(self._sql.give_back_unknown, [self.id, known])
                self._uncertain = False
        except RETRYABLE as exc:
            self._trouble("reconnect", exc)
            return False
        self._outage.over()
        return True

    def _trouble(self, what: str, exc: BaseException) -> None:
        self._drop()
        self._outage.began(what, exc)

    # -- shutdown --------------------------------------------------------------------------------
    def close(self) -> None:
        """Give every held message back (at the front of its queue) and end the lease."""
        if self._closed:
            return
        self._closed = True
        self._heartbeat.stop()
        held = len(self._held)
        self._flush_acks()
        try:
            if not self._settle():
                raise psycopg.OperationalError("the server is unreachable")
            conn = self._main()
            with conn.transaction():
                conn.execute(self._sql.give_back_all, [self.id])
                conn.execute(self._sql.leave, [self.id])
        except psycopg.Error as exc:
            log.error(
                "postgres: could not give back %d held message(s) on close (%s); they return "
                "to their queues when this consumer's lease expires (lease_timeout=%gs)",
                held,
                str(exc).strip(),
                self._cfg.lease_timeout,
            )
        finally:
            self._held.clear()
            self._drop()
            close_quietly(self._beat_conn)
            self._beat_conn = None

    @property
    def connected(self) -> bool:
        """False from a failed round trip until the next one succeeds (for the readiness probe)."""
        return not self._outage.failing and not self._closed

    @property
    def held(self) -> int:
        """Messages fetched and not yet acknowledged or rejected."""
        return len(self._held)
