"""Zookeeper as a broker that loses nothing when a worker is killed: kombu's queues, plus in-flight
znodes owned by a session-bound lease.

kombu's zookeeper transport stores each message as a sequential znode `<vhost>/<queue>/entry-PPP-N`
(kazoo's Queue recipe, PPP the reversed priority) holding kombu's JSON envelope, and deletes it
when a consumer gets it: a worker killed with messages in hand would lose them. A millpond
consumer keeps kombu's queues and bytes (Celery producers and workers share them), but claims a
message by moving it, in one Zookeeper transaction (create the copy, delete the original at the
version it read, so two consumers never both get it), to

    <vhost>/.millpond/inflight/<consumer>/<queue>/entry-PPP-N

and it owns that directory through the *ephemeral* znode `<vhost>/.millpond/owners/<consumer>`,
which Zookeeper deletes when the consumer's session ends: a process that dies, however it dies,
stops sending the session's pings, and the server expires it after the session timeout (kazoo's
10 s, bounded by the server's min/maxSessionTimeout). Every consumer's lease keeper (core
`LeaseKeeper`, beating every `recover_interval`) looks for in-flight directories whose owner znode
is gone and moves their messages back to their queues, counting the delivery, again one
transaction per message, so only one consumer restores each. Ack deletes the in-flight copy;
reject moves it back (or to `<queue>.dead`).

A live worker keeps its messages however long its tasks run (kazoo pings from its own thread). A
worker cut off from Zookeeper for longer than the session timeout loses its session: its messages
go to other workers (delivered twice, never lost) and the keeper takes a new lease when the
server answers again.

Delays live in Zookeeper too: a publish with an eta in the future writes kombu's envelope to

    <vhost>/.millpond/delayed/<queue>/<due ms, 16 digits>-PPP-<uuid>

so a queue's delayed children sort by due time and their names alone say which are due. A
consumer looks there (names only) at most every `DELAY_CHECK` seconds while it fetches, and its
lease keeper at every beat; it moves each due message into the queue as `entry-PPP-N` (kombu's
name, the priority kept) in one transaction (create in the queue, delete the delayed znode at the
version read), so with several workers exactly one moves it, and a worker dying mid-move leaves
it either still delayed or in the queue.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import time
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar

from kazoo.exceptions import KazooException, NodeExistsError, NoNodeError, NotEmptyError

from millpond.contracts.broker import Consumer, Delivery, QueueStats, dead_letter_queue
from millpond.contracts.lease import BeatResult, LeaseKeeper
from millpond.contracts.waking import Waker
from millpond.exceptions import MalformedMessage, PublishError
from millpond.wire import envelope
from millpond.wire.protocol import DEATH_REASON, Message
from millpond_broker_kombu.generic import KombuBroker
from millpond_broker_kombu.link import release
from millpond_broker_kombu.polling import delivered, poll_fetch, take_in_turn
from millpond_broker_kombu.stored import bump_count, rewrite_headers

log = logging.getLogger("millpond.broker.zookeeper")

#: millpond's own znodes under the vhost (a queue of this name is not a kombu queue anyone uses)
OWN = ".millpond"

#: the least seconds between two looks at a queue's delayed znodes while a consumer fetches (it
#: looks at each poll, every polling_interval, no more often than this): a due message reaches
#: its queue within about max(polling_interval, DELAY_CHECK) of its due time
DELAY_CHECK = 0.05

#: the errors a later beat or fetch may cure: the server is away or the session is being replaced
_TRANSIENT: tuple[type[BaseException], ...] = (KazooException, OSError)


def _entry_prefix(name: str) -> str:
    """`entry-PPP-` of kazoo's sequential name `entry-PPP-0000000042`: a message moved back to a
    queue keeps its priority and takes a fresh sequence number (the queue's tail)."""
    head, sep, seq = name.rpartition("-")
    return head + sep if sep and seq.isdigit() else "entry-"


def _due_ms(name: str) -> int | None:
    """The due time (ms since the epoch) a delayed znode's name starts with; None when the name
    is not one of ours."""
    due, _, _rest = name.partition("-")
    return int(due) if due.isdigit() else None


def _delayed_prefix(name: str) -> str:
    """`entry-PPP-` for the queue znode a delayed `<due>-PPP-<uuid>` becomes."""
    parts = name.split("-")
    return f"entry-{parts[1]}-" if len(parts) >= 3 and parts[1].isdigit() else "entry-"


class ZookeeperBroker(KombuBroker):
    """`zookeeper://host:port[,host:port...]/vhost`: kombu's transport, at-least-once."""

    system: ClassVar[str] = "zookeeper"
    redelivers_lost_deliveries: ClassVar[bool] = True
    supports_delay: ClassVar[bool] = True

    def __repr__(self) -> str:
        return f"<ZookeeperBroker {self.safe_url}>"

    def consumer(self, queues: Sequence[str], prefetch: int) -> Consumer:
        return ZookeeperConsumer(self, list(queues), prefetch)

    def publish(self, queue: str, message: Message, *, eta: float | None = None) -> None:
        if eta is None or eta <= time.time():
            self.link.publish(queue, message)
            return
        payload = envelope.dumps(message, queue=queue).encode()

        def hold(conn: Any, _p: Any) -> None:
            channel = conn.default_channel
            # kombu's reversed priority, as its _put would name the queue znode
            priority = channel._get_message_priority(json.loads(payload), reverse=True)
            name = f"{math.ceil(eta * 1000):016d}-{priority:03d}-{uuid.uuid4().hex}"
            path = posixpath.join(channel._get_path(OWN), "delayed", queue, name)
            channel.client.create(path, payload, makepath=True)

        self.link.run(f"publishing a delayed message to {queue!r}", hold, PublishError)

    def queue_stats(self, queue: str) -> QueueStats:
        def count(conn: Any, _p: Any) -> int:
            channel = conn.default_channel
            try:
                path = posixpath.join(channel._get_path(OWN), "delayed", queue)
                return len(channel.client.get_children(path))
            except NoNodeError:
                return 0

        delayed = int(self.link.run(f"counting the delayed messages of {queue!r}", count))
        return QueueStats(queue, self.queue_length(queue), delayed=delayed)


class ZookeeperConsumer(Consumer):
    """Claims messages into its in-flight znodes; its lease keeper restores dead consumers'."""

    def __init__(self, broker: ZookeeperBroker, queues: list[str], prefetch: int) -> None:
        self.broker = broker
        self.queues = queues
        self.prefetch = max(1, prefetch)
        self.poll = float(broker.settings["polling_interval"])
        self.conn: Any = broker.link.new_connection()
        self.channel: Any = self.conn.default_channel
        self.client: Any = (
            self.channel.client
        )  # kazoo's client: thread-safe, shared with the keeper
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"  # the pid says whose it is
        own = self.channel._get_path(OWN)
        self.owners = posixpath.join(own, "owners")
        self.inflight = posixpath.join(own, "inflight")
        self.dir = posixpath.join(self.inflight, self.id)
        self.delayed = posixpath.join(own, "delayed")
        self._next_check = 0.0  # monotonic time of the next look at the delayed znodes
        self._held: dict[str, Delivery] = {}
        self._turn = 0
        self._closed = False
        for queue in queues:  # kombu's declare, so the queue znodes exist before the first look
            self.channel.queue_declare(queue=queue)
        self.keeper = LeaseKeeper(
            self._beat,
            float(broker.settings["recover_interval"]),
            "zookeeper",
            broker.safe_url,
            _TRANSIENT,
        )
        try:
            self.keeper.beat_once(strict=(Exception,))  # the lease exists before the first claim
        except BaseException:
            release(self.conn)
            raise
        self.keeper.start()

    @property
    def connected(self) -> bool:
        return not self._closed and bool(self.client.connected)

    # -- the lease -------------------------------------------------------------------------------
    def _beat(self) -> BeatResult:
        """Hold the owner znode (a new one when the session was replaced), then restore what
        consumers whose owner znode is gone left in flight."""
        lapsed = self.client.exists(posixpath.join(self.owners, self.id)) is None
        if lapsed:
            # the owner znode before the directory: a restorer that sees a directory without its
            # owner must be right that the owner is dead
            self.client.ensure_path(self.owners)
            try:
                self.client.create(posixpath.join(self.owners, self.id), b"", ephemeral=True)
            except NodeExistsError:
                lapsed = False  # made by the previous beat, whose reply was lost on the way back
            self.client.ensure_path(self.dir)
        restored = self._recover()
        self.promote_due()
        return BeatResult(lapsed=lapsed, restored=restored)

    # -- delays ----------------------------------------------------------------------------------
    def promote_due(self) -> int:
        """Move the delayed messages of this consumer's queues that are due into their queues;
        returns how many this call moved (another consumer may move some first)."""
        now = int(time.time() * 1000)
        moved = 0
        for queue in self.queues:
            qdir = posixpath.join(self.delayed, queue)
            try:
                names = sorted(self.client.get_children(qdir))
            except NoNodeError:
                continue
            for name in names:
                due = _due_ms(name)
                if due is None:
                    continue
                if due > now:
                    break
                if self._promote(posixpath.join(qdir, name), queue, _delayed_prefix(name)):
                    moved += 1
        return moved

    def _promote(self, src: str, queue: str, prefix: str) -> bool:
        """One due message into `queue` in one transaction; False when another consumer did."""
        try:
            raw, stat = self.client.get(src)
        except NoNodeError:
            return False
        return self._swap(src, stat.version, raw, queue, prefix)

    def _swap(self, src: str, version: int, raw: bytes, queue: str, prefix: str) -> bool:
        """`raw` as a new znode `prefix<seq>` of `queue` and `src` (at `version`) deleted, in one
        transaction; False when another consumer took `src` first."""
        dst = posixpath.join(self.channel._get_path(queue), prefix)
        for attempt in (1, 2):
            tx = self.client.transaction()
            tx.create(dst, raw, sequence=True)
            tx.delete(src, version=version)
            results = tx.commit()
            if not any(isinstance(r, Exception) for r in results):
                return True
            if isinstance(results[0], NoNodeError) and attempt == 1:
                self.channel.queue_declare(queue=queue)  # the queue znode was deleted: remake it
                continue
            return False
        return False

    def _recover(self) -> int:
        # in-flight directories first, owners second: a consumer makes its owner znode before its
        # directory, so a directory seen here whose owner is not listed after has a dead owner
        try:
            dirs = self.client.get_children(self.inflight)
        except NoNodeError:
            return 0
        alive = set(self.client.get_children(self.owners))
        restored = 0
        for owner in dirs:
            if owner in alive or owner == self.id:
                continue
            restored += self._restore_dir(posixpath.join(self.inflight, owner), counted=True)
            self._remove(posixpath.join(self.inflight, owner))
        return restored

    def _restore_dir(self, owner_dir: str, *, counted: bool) -> int:
        """Move every message under `owner_dir` back to its queue; returns how many this call
        moved (another consumer restoring the same directory moves the rest)."""
        restored = 0
        try:
            queues = self.client.get_children(owner_dir)
        except NoNodeError:
            return 0
        for queue in queues:
            qdir = posixpath.join(owner_dir, queue)
            try:
                names = sorted(self.client.get_children(qdir))
            except NoNodeError:
                continue
            for name in names:
                if self._move(posixpath.join(qdir, name), queue, name, counted=counted):
                    restored += 1
            self._remove(qdir)
        return restored

    def _remove(self, path: str) -> None:
        try:
            self.client.delete(path)
        except (NoNodeError, NotEmptyError):
            pass  # gone already, or another consumer is still restoring into it

    def _move(
        self,
        src: str,
        queue: str,
        name: str,
        *,
        counted: bool,
        dead: bool = False,
        reason: str = "",
    ) -> bool:
        """Move the in-flight znode `src` (a message of `queue` named `name`) back to `queue`, or
        to its dead-letter queue when `dead` (saying `reason`), in one transaction; False when
        another consumer moved it first."""
        try:
            raw, stat = self.client.get(src)
        except NoNodeError:
            return False
        target = dead_letter_queue(queue) if dead else queue
        try:
            if dead:
                raw = rewrite_headers(raw, {DEATH_REASON: reason})
            elif counted:
                raw = bump_count(raw)
        except ValueError:
            pass  # not kombu's envelope: hand it back as it is, the worker dead-letters it
        return self._swap(src, stat.version, raw, target, _entry_prefix(name))

    # -- the consumer contract -------------------------------------------------------------------
    def _claim(self, queue: str) -> Delivery | None:
        """The oldest message of `queue` this consumer could move into its in-flight directory."""
        qpath = self.channel._get_path(queue)
        try:
            names = sorted(self.client.get_children(qpath))
        except NoNodeError:
            return None
        for name in names:
            src = posixpath.join(qpath, name)
            try:
                raw, stat = self.client.get(src)
            except NoNodeError:
                continue  # another consumer took it
            dst = posixpath.join(self.dir, queue, name)
            for attempt in (1, 2):
                tx = self.client.transaction()
                tx.create(dst, raw)
                tx.delete(src, version=stat.version)
                results = tx.commit()
                if not any(isinstance(r, Exception) for r in results):
                    return self._open(dst, raw, queue)
                if isinstance(results[0], NoNodeError) and attempt == 1:
                    self.client.ensure_path(posixpath.join(self.dir, queue))
                    continue
                break  # another consumer took it (the delete saw no node at that version)
        return None

    def _open(self, path: str, raw: bytes, queue: str) -> Delivery | None:
        try:
            message = envelope.loads(raw)
        except MalformedMessage as exc:
            log.warning("zookeeper: dead-lettering undecodable message %s: %s", path, exc)
            bad = Message(body=raw, headers={DEATH_REASON: f"undecodable message: {exc}"},
                          content_type="application/octet-stream")  # fmt: skip
            self.broker.link.publish(dead_letter_queue(queue), bad)
            self._delete(path)
            return None
        delivery = delivered(message, queue, path)
        self._held[path] = delivery
        return delivery

    def _get(self, want: int) -> list[Delivery]:
        out, self._turn = take_in_turn(self.queues, self._turn, want, self._claim)
        return out

    def fetch(self, max_count: int, timeout: float, waker: Waker | None = None) -> list[Delivery]:
        def look() -> list[Delivery]:
            want = min(max_count, self.prefetch - len(self._held))
            if want > 0 and time.monotonic() >= self._next_check:
                self._next_check = time.monotonic() + DELAY_CHECK
                self.promote_due()
            return self._get(want)

        return poll_fetch(look, timeout, self.poll, waker, lambda: self._closed)

    def _delete(self, path: str) -> None:
        try:
            self.client.delete(path)
        except NoNodeError:
            # restored to its queue while this consumer's session was away: it runs again
            log.warning("zookeeper: %s was given back before its ack (session lost)", path)

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            path = str(d.tag)
            self._held.pop(path, None)
            self._delete(path)

    def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        path = str(delivery.tag)
        self._held.pop(path, None)
        name = posixpath.basename(path)
        self._move(path, delivery.queue, name, counted=requeue, dead=not requeue, reason=reason)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.keeper.stop()
        self._held.clear()
        try:
            self._restore_dir(self.dir, counted=True)
            self._remove(self.dir)
            self._remove(posixpath.join(self.owners, self.id))
        except _TRANSIENT as exc:
            # what stays in flight comes back when another consumer sees the owner znode gone
            log.warning("zookeeper: could not give back held messages at close (%s); another "
                        "consumer restores them once this session ends", exc)  # fmt: skip
        release(self.conn)
