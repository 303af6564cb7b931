"""The Redis consumer: batched, atomic reservation; batched acks; leases instead of timeouts.

One `fetch` is one round trip whatever the batch size: a Lua script promotes due delayed messages,
pops up to `max_count` messages from the queues (priority steps first, then queues round-robin) and
records each in this consumer's `unacked` hash, atomically, so a message is always either in a queue
or held by a named consumer. `ack` is one HDEL for the whole batch.

Held messages stay held for as long as this consumer's lease is alive (see
`millpond.contracts.lease`), however long a task runs. When the lease expires (the process died),
any consumer's restorer gives them back to the front of their queues, counting the delivery.

Connection trouble never crashes the worker loop: a failed fetch logs, waits a little (woken early
by the waker) and returns an empty list; the next call reconnects. Acks and rejects that cannot
reach Redis are kept and sent again before the next fetch. A fetch whose reply was lost may have
reserved messages this consumer never saw: their tags are known (the consumer hands tags out), and
they are given back, uncounted, as soon as Redis answers again.

On Redis Cluster a script may only touch keys of one slot, so the consumer keeps one `_Part` per
queue (its own unacked hash, lease and registration under the queue's hash tag, `keys.Layout`) and
a fetch runs the same script once per queue until the batch is full; on one server there is one
part for all queues and a fetch stays one round trip. Tags stay unique across parts, so a delivery
is settled in the part that holds it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from millpond.contracts.broker import Consumer, Delivery
from millpond.contracts.lease import BeatResult, LeaseKeeper, Outage
from millpond.contracts.waking import Waker
from millpond.exceptions import AccessDenied, MalformedMessage
from millpond.wire import envelope
from millpond.wire.protocol import DEATH_REASON, Message
from millpond_broker_redis import keys
from millpond_broker_redis.connection import ACCESS_ERRORS, access_problem, is_transient
from millpond_broker_redis.doorbell import TIMEOUT, WOKEN, Doorbells

if TYPE_CHECKING:
    from millpond_broker_redis.broker import RedisBroker

log = logging.getLogger("millpond.broker.redis")

#: the most messages one fetch reserves (keeps the script's reply and Lua's stack bounded)
MAX_BATCH = 1000


def consumer_id() -> str:
    """Readable and unique: `redis-cli keys 'millpond:unacked:*'` shows which host holds what."""
    return f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:12]}"


def dead_envelope(message: Message, queue: str, reason: str) -> str:
    """The envelope stored in the dead-letter list: the same message plus the death reason."""
    headers = dict(message.headers)
    headers[DEATH_REASON] = reason
    dead = Message(
        body=message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        properties=dict(message.properties),
    )
    return envelope.dumps(dead, queue=queue)


@dataclass(frozen=True, slots=True)
class _Part:
    """Queues whose keys one script may touch together, and this consumer's keys beside them."""

    queues: list[str]
    #: queue -> its name in keys (itself, or its hash tag on a cluster)
    keyed: dict[str, str]
    #: this consumer's id among these keys
    member: str
    unacked: str
    lease: str
    consumers: str
    gate: str
    serving: list[str]


class RedisConsumer(Consumer):
    def __init__(self, broker: RedisBroker, queues: Sequence[str], prefetch: int) -> None:
        if isinstance(queues, str):
            queues = [queues]
        if not queues:
            raise ValueError("a consumer needs at least one queue")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 (0 means no limit), got {prefetch}")
        self._broker = broker
        cfg = broker.cfg
        self._cfg = cfg
        self.queues = [keys.check_queue(q) for q in dict.fromkeys(queues)]
        self.prefetch = prefetch
        layout = broker.layout
        self.queues = [layout.check(q) for q in self.queues]
        self.id = consumer_id()
        groups = [[q] for q in self.queues] if layout.cluster else [self.queues]
        self._parts = [self._part(layout, group) for group in groups]
        #: tag -> index of the part that holds it, for every tag fetched and not yet settled
        self._part_of: dict[int, int] = {}
        self._lease_ms = max(1, int(cfg.lease_timeout * 1000))
        self._steps = [str(s) for s in cfg.steps]
        self._rotate = cfg.queue_order_strategy == "round_robin" and len(self.queues) > 1
        self._cluster = layout.cluster
        self._turn = 0
        self._next_tag = 1
        #: tags below this were fetched under a lease that has lapsed since (`stale`)
        self._lost_below = 0
        #: a lapse noticed by the clock, not yet cured by a heartbeat reply (`stale`)
        self._lapse_noted = False
        #: when the last heartbeat's reply arrived: the lease key expires at most lease_timeout
        #: later, so past that this consumer's lease has lapsed for certain
        self._beat_ok_at = time.monotonic()
        self._held: set[int] = set()
        self._pending: list[tuple[str, Callable[[redis.Redis], Any]]] = []
        #: part index -> tags whose reservation may have happened unseen (a lost reply)
        self._uncertain: dict[int, list[int]] = {}
        self._outage = Outage("redis", self._cfg.masked_url)
        #: set by connection trouble: after it, the hash may hold entries already settled
        self._reconcile_due = False
        self._closed = False

        self._client, self._pool_for = broker.pools.own_client()
        self._beat_client = self._client
        self._scripts = broker.scripts
        self._bells: Doorbells | None = None
        broker.served.update(self.queues)  # a Counter: several consumers may share a queue
        self._beaten = False
        self._heartbeat = LeaseKeeper(
            self._beat, cfg.heartbeat_interval, "redis", cfg.masked_url, (redis.RedisError,)
        )
        try:  # the lease exists before the first message is reserved
            self._heartbeat.beat_once(strict=ACCESS_ERRORS)
        except ACCESS_ERRORS as exc:
            self._client.close()
            broker.served.subtract(self.queues)
            raise AccessDenied(access_problem(cfg, "taking the consumer's lease", exc)) from exc
        self._heartbeat.start()

    def _part(self, layout: keys.Layout, queues: list[str]) -> _Part:
        first = queues[0]
        member = layout.member(first, self.id)
        keyed = {q: layout.queue(q) for q in queues}
        return _Part(
            queues=queues,
            keyed=keyed,
            member=member,
            unacked=keys.unacked_key(member),
            lease=keys.lease_key(member),
            consumers=layout.consumers(first),
            gate=layout.restore_gate(first),
            serving=[keys.serving_key(keyed[q]) for q in queues],
        )

    # -- lease -----------------------------------------------------------------------------------
    def _beat(self) -> BeatResult:
        gate_ms = max(50, int(min(1.0, self._cfg.heartbeat_interval) * 1000))
        fetched = self._next_tag
        lapsed_meanwhile = self._lapsed()
        alive, restored = True, 0
        failed: redis.RedisError | None = None
        for part in self._parts:  # one lease per part: each lives beside the keys it guards
            try:
                part_alive, part_restored = self._scripts.beat(
                    keys=[part.lease, part.consumers, part.gate, *part.serving],
                    args=[self._lease_ms, keys.SEP, gate_ms, part.member],
                    client=self._beat_client,
                )
            except redis.RedisError as exc:
                # one primary away must not let the leases on the others lapse: beat them all
                failed = failed or exc
                continue
            alive = alive and bool(part_alive)
            restored += int(part_restored)
        if failed is not None:
            raise failed
        if (not alive and self._beaten) or lapsed_meanwhile:
            # the lease had expired: what was fetched before may be another consumer's now
            self._lost_below = max(self._lost_below, fetched)
        self._beat_ok_at = time.monotonic()
        self._lapse_noted = False
        self._beaten = True
        return BeatResult(lapsed=not alive, restored=int(restored))

    def _lapsed(self) -> bool:
        return time.monotonic() > self._beat_ok_at + self._cfg.lease_timeout

    def stale(self, delivery: Delivery) -> bool:
        """Fetched under a lease that lapsed since: the stalled-and-resumed case, told either by
        the clock (no heartbeat reply within lease_timeout) or by the heartbeat finding the lease
        gone. What was fetched once the lapse was noticed is not: it went back (and came again)
        after it, so marking it too would send it round and round until it dead-lettered."""
        if self._lapsed() and not self._lapse_noted:
            self._lapse_noted = True  # until a heartbeat reaches Redis again
            self._lost_below = max(self._lost_below, self._next_tag)
        return isinstance(delivery.tag, int) and delivery.tag < self._lost_below

    # -- fetching --------------------------------------------------------------------------------
    def _order(self) -> list[tuple[int, list[str]]]:
        """(part, its queues in the order to serve them), in the order to visit the parts."""
        if not self._cluster:
            queues = self.queues
            if self._rotate:
                turn = self._turn
                self._turn = (turn + 1) % len(queues)
                queues = queues[turn:] + queues[:turn]
            return [(0, queues)]
        order = list(range(len(self._parts)))
        if self._rotate:
            turn = self._turn
            self._turn = (turn + 1) % len(order)
            order = order[turn:] + order[:turn]
        return [(i, self._parts[i].queues) for i in order]

    def _room(self, max_count: int) -> int:
        room = min(max_count, MAX_BATCH)
        if self.prefetch:
            room = min(room, self.prefetch - len(self._held))
        return room

    def fetch(self, max_count: int, timeout: float, waker: Waker | None = None) -> list[Delivery]:
        try:
            return self._fetch(max_count, timeout, waker)
        except ACCESS_ERRORS as exc:  # credentials or ACL: no retry cures it, stop the worker
            raise AccessDenied(access_problem(self._cfg, "fetching", exc)) from exc

    def _fetch(self, max_count: int, timeout: float, waker: Waker | None) -> list[Delivery]:
        if self._closed:
            raise RuntimeError("fetch() on a closed consumer; create a new one")
        deadline = time.monotonic() + max(timeout, 0.0)
        if not self._settle():
            self._outage.pause(deadline, waker)
            return []
        if self._reconcile_due:
            try:
                self._reconcile()
            except redis.RedisError as exc:
                self._trouble("reconciling reservations", exc)
                self._outage.pause(deadline, waker)
                return []
        while True:
            room = self._room(max_count)
            if room <= 0:  # prefetch window full: only a completion (the waker) helps
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    if waker is not None:
                        waker.wait(remaining)
                    else:
                        time.sleep(remaining)
                return []
            if self._bells is not None:
                self._bells.drain()
            try:
                deliveries, due_ms = self._reserve(room)
            except ACCESS_ERRORS:
                raise  # fetch() says what to check
            except redis.RedisError as exc:  # never crash the worker loop: report, wait, retry
                self._trouble("fetch", exc)
                self._outage.pause(deadline, waker)
                return []
            self._outage.over()
            if deliveries:
                return deliveries
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            if due_ms >= 0:
                remaining = min(remaining, due_ms / 1000.0)
            outcome = self._doorbells().wait(remaining, waker)
            if outcome == WOKEN or (outcome == TIMEOUT and time.monotonic() >= deadline):
                return []

    def _reserve(self, room: int) -> tuple[list[Delivery], int]:
        """Reserve up to `room` messages, part by part; and, when none came, the ms until the
        next delayed message is due (-1: none). A failure after some parts delivered keeps
        what they delivered (it is held) and leaves the error to the next fetch."""
        out: list[Delivery] = []
        due = -1
        for index, queues in self._order():
            if room <= 0:
                break
            try:
                got, part_due = self._reserve_part(index, queues, room)
            except ACCESS_ERRORS:
                raise
            except redis.RedisError as exc:
                if not out:
                    raise
                self._trouble("fetch", exc)
                return out, -1
            out += got
            room -= len(got)
            if part_due >= 0 and (due < 0 or part_due < due):
                due = part_due
        return out, (-1 if out else due)

    def _reserve_part(self, index: int, queues: list[str], room: int) -> tuple[list[Delivery], int]:
        part = self._parts[index]
        first = self._next_tag
        self._next_tag += room
        args: list[Any] = [part.member, room, first, self._lease_ms, keys.SEP, len(queues)]
        args.extend(part.keyed[q] for q in queues)
        args.append(len(self._steps))
        args.extend(self._steps)
        try:
            reply = self._scripts.fetch(
                keys=[part.unacked, part.lease, part.consumers],
                args=args,
                client=self._client,
            )
        except redis.RedisError:
            # the script may have run and its reply been lost: these tags may hold messages
            self._uncertain.setdefault(index, []).extend(range(first, first + room))
            raise
        count = int(reply[0])
        held_here = sum(1 for i in self._part_of.values() if i == index) if self._cluster else None
        if int(reply[-1]) > (len(self._held) if held_here is None else held_here) + count:
            self._reconcile_due = True  # settled entries still reserved
        if count == 0:
            return [], int(reply[1])
        out: list[Delivery] = []
        for i in range(count):
            qi, n, raw = reply[1 + 3 * i : 4 + 3 * i]
            tag = first + i
            queue = queues[int(qi) - 1]
            self._part_of[tag] = index
            try:
                message = envelope.loads(raw)
            except MalformedMessage as exc:
                self._bury_unreadable(tag, queue, raw, exc)
                continue
            n = int(n)
            out.append(Delivery(message, queue, tag, n > 1, n))
            self._held.add(tag)
        return out, -1

    def _bury_unreadable(self, tag: int, queue: str, raw: bytes, exc: Exception) -> None:
        """A list entry that is not a kombu envelope: keep its bytes, in the dead-letter list."""
        reason = f"not a kombu JSON envelope ({exc}); the original bytes are the body"
        log.error("redis: message in queue %r is unreadable: %s; dead-lettering it", queue, exc)
        wrapped = Message(body=bytes(raw), headers={}, content_type="application/octet-stream")
        self._dead_letter(tag, queue, dead_envelope(wrapped, queue, reason))

    def _doorbells(self) -> Doorbells:
        if self._bells is None:
            steps = self._cfg.steps
            keyed = {q: k for part in self._parts for q, k in part.keyed.items()}
            list_keys = [keys.list_key(keyed[q], s) for s in steps for q in self.queues]
            self._bells = Doorbells(
                self._pool_for,
                list_keys,
                [keys.bell_channel(keyed[q]) for q in self.queues],
                self._cfg.idle_timeout,
                self._cfg.socket_timeout,
            )
        return self._bells

    # -- acknowledging ---------------------------------------------------------------------------
    def ack(self, deliveries: Sequence[Delivery]) -> None:
        tags = [d.tag for d in deliveries]
        if not tags:
            return
        self._held.difference_update(tags)
        by_part: dict[int, list[int]] = {}
        for tag in tags:
            by_part.setdefault(self._part_of.pop(tag, 0), []).append(tag)
        for index, some in by_part.items():
            ukey = self._parts[index].unacked
            self._run(
                f"ack of {len(some)} message(s)",
                lambda c, u=ukey, t=some: self._acked(c.hdel(u, *t), len(t)),  # type: ignore[misc]
            )

    def _acked(self, removed: int, asked: int) -> None:
        if removed < asked:
            log.warning(
                "redis: %d of %d acknowledged message(s) were no longer held by this consumer "
                "(its lease lapsed and they went back to the queue); they may run again",
                asked - removed,
                asked,
            )

    def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        tag = delivery.tag
        self._held.discard(tag)
        if requeue:
            ukey = self._parts[self._part_of.pop(tag, 0)].unacked
            self._run(
                "requeue",
                lambda c: self._scripts.requeue(keys=[ukey], args=[keys.SEP, 0, tag], client=c),
            )
            return
        payload = dead_envelope(delivery.message, delivery.queue, reason)
        self._dead_letter(tag, delivery.queue, payload)

    def _dead_letter(self, tag: int, queue: str, payload: str) -> None:
        self._held.discard(tag)
        part = self._parts[self._part_of.pop(tag, 0)]
        # on a cluster `{queue}.dead`: the dead-letter list shares its queue's slot
        dead = keys.dead_key(part.keyed[queue])

        def move(c: redis.Redis) -> None:
            done = self._scripts.dead_letter(
                keys=[part.unacked, dead], args=[tag, payload], client=c
            )
            if not done:
                log.warning(
                    "redis: a message of %r was not dead-lettered: this consumer no longer held "
                    "it (its lease lapsed and it went back to the queue)",
                    queue,
                )

        self._run("dead-lettering", move)

    # -- connection trouble ----------------------------------------------------------------------
    def _run(self, what: str, op: Callable[[redis.Redis], Any]) -> None:
        """Run `op` now, or keep it for the next call if Redis cannot be reached."""
        if self._pending:
            self._settle()
        if self._pending:
            self._pending.append((what, op))
            return
        try:
            op(self._client)
        except redis.RedisError as exc:
            if is_transient(exc):
                self._pending.append((what, op))
                self._trouble(what, exc)
            else:
                self._outage.refused(what, exc)
        else:
            self._outage.over()

    def _settle(self) -> bool:
        """Send what is owed (kept acks, rejects, lost reservations); False if Redis is away."""
        try:
            for index in list(self._uncertain):
                tags = sorted(self._uncertain[index], reverse=True)
                self._scripts.requeue(
                    keys=[self._parts[index].unacked],
                    args=[keys.SEP, 1, *tags],
                    client=self._client,
                )
                del self._uncertain[index]
            while self._pending:
                what, op = self._pending[0]
                try:
                    op(self._client)
                except redis.RedisError as exc:
                    if is_transient(exc):
                        raise
                    self._outage.refused(what, exc)
                self._pending.pop(0)
        except redis.RedisError as exc:
            self._trouble("reconnect", exc)
            return False
        self._outage.over()
        return True

    def _reconcile(self) -> None:
        """Give back reservations this consumer no longer knows of (after connection trouble, or
        when the fetch script counted more reserved entries than the consumer holds).

        Every entry of the unacked hash is a message this consumer holds, or one whose ack or
        reject it already sent (or whose reservation it gave back as uncertain). After a
        Sentinel failover the new primary may lack those settlements: the old primary took them
        in its last moments and never replicated them. Such entries would stay reserved for as
        long as this consumer lives (its lease stays fresh). They go back to their queue now, so
        a lost requeue or dead-lettering is redone rather than stuck, at the price that a message
        whose ack was lost runs again (at-least-once; see docs/guarantees.md).
        """
        self._reconcile_due = False
        given = 0
        for part in self._parts:
            tags = [int(t) for t in self._client.hkeys(part.unacked)]
            orphans = sorted((t for t in tags if t not in self._held), reverse=True)
            if orphans:
                given += int(
                    self._scripts.requeue(
                        keys=[part.unacked], args=[keys.SEP, 1, *orphans], client=self._client
                    )
                )
        if not given:
            return
        log.warning(
            "redis: %d message(s) this consumer had already acknowledged or given back were "
            "still reserved on %s (a failover lost the settlement); they "
            "went back to their queue and may run again",
            given,
            self._cfg.masked_url,
        )

    def _trouble(self, what: str, exc: BaseException) -> None:
        self._reconcile_due = True
        if self._bells is not None:
            self._bells.reset()
        self._outage.began(what, exc, lasting=not is_transient(exc))

    # -- shutdown --------------------------------------------------------------------------------
    def close(self) -> None:
        """Give every held message back (to the front of its queue) and stop the lease."""
        if self._closed:
            return
        self._closed = True
        self._heartbeat.stop()
        if self._bells is not None:
            self._bells.close()
        try:
            if self._settle():
                for part in self._parts:
                    self._scripts.close(
                        keys=[part.unacked, part.lease, part.consumers],
                        args=[keys.SEP, part.member],
                        client=self._client,
                    )
            else:
                raise redis.ConnectionError("Redis unreachable")
        except redis.RedisError as exc:
            log.error(
                "redis: could not give back %d held message(s) on close (%s); they return to "
                "their queues when this consumer's lease expires (lease_timeout=%gs)",
                len(self._held),
                exc,
                self._cfg.lease_timeout,
            )
        finally:
            self._held.clear()
            self._part_of.clear()
            self._leave_queues()
            self._client.close()

    def _leave_queues(self) -> None:
        """Stop counting as a server of these queues; say so when this was the last millpond
        worker of a queue whose delayed messages still wait in Redis (only a millpond worker
        releases them)."""
        self._broker.served.subtract(self.queues)
        for queue in self.queues:
            if self._broker.served[queue] <= 0:
                del self._broker.served[queue]
        try:
            for part in self._parts:
                for queue, serving in zip(part.queues, part.serving, strict=True):
                    left = self._scripts.serving(
                        keys=[serving], args=[part.member], client=self._client
                    )
                    dkey = keys.delayed_key(part.keyed[queue])
                    waiting = 0 if left else self._client.zcard(dkey)
                    if waiting:
                        log.warning(
                            "redis: %d delayed message(s) of queue %r wait in Redis and no other "
                            "millpond worker serves it now; they run when one does (with "
                            "delays=auto, new delays go out Celery-style meanwhile)",
                            waiting,
                            queue,
                        )
        except redis.RedisError as exc:
            log.debug("redis: could not leave the serving sets (%s); they expire", exc)

    def resize(self, prefetch: int) -> bool:
        """The prefetch limit is this consumer's own count: a new one applies from the next
        fetch."""
        if prefetch < 0:
            return False
        self.prefetch = prefetch
        return True

    @property
    def connected(self) -> bool:
        """False from a failed round trip until the next one succeeds (for the readiness probe)."""
        return not self._outage.failing and not self._closed

    @property
    def held(self) -> int:
        """Messages fetched and not yet acknowledged or rejected."""
        return len(self._held)
