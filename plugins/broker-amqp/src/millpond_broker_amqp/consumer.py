"""The worker's AMQP consumer: basic.consume with a prefetch window, batched acks, heartbeats
served while the loop is busy, and reconnection that never acks the wrong message.

Threads: the consumer loop calls `fetch`, `ack`, `reject` and `close`; a heartbeat thread
(`Pulse`) wakes every quarter heartbeat. Both take `_lock` around every use of the connection. The
loop does not hold it while it sleeps in `select`, and while it is inside `fetch` it reads the
socket itself, so the heartbeat thread only sends heartbeats; while the loop is away (a solo pool
running a task inline) the heartbeat thread also reads, so RabbitMQ's heartbeats are consumed and
deliveries are buffered rather than left in the socket.

Delivery tags are `(generation, tag)` pairs; every reconnect starts a new generation, so an ack
for a delivery of a lost connection is dropped (RabbitMQ redelivers that message) instead of
acknowledging whatever carries the same number on the new channel.

An ack written into the socket is not known to have arrived: a black-holed link takes writes for
as long as its buffers last, and AMQP acks have no reply. RabbitMQ handles a channel's frames in
order, so two things prove acks arrived. Under load, the prefetch window does, for free: RabbitMQ
sends delivery T only while fewer than `limit` deliveries are unacknowledged, so by then it had
the first T - limit acks (and rejects) in the order they were written. When deliveries stop
coming, a probe does: the consumer re-sends its unchanged `basic.qos` (one in flight, at most one
per `_PROBE_GAP`), and the `qos-ok` proves every ack written before it. When the connection is
lost, the deliveries RabbitMQ redelivers are those never acknowledged plus those whose acks were
not proven yet; that is the count the worker logs (high, if ever wrong, by acks of the last few
milliseconds whose proof was still on its way).
"""

from __future__ import annotations

import logging
import select
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import amqp
from amqp import spec

from millpond.contracts.broker import Consumer, Delivery, dead_letter_queue
from millpond.contracts.waking import Waker
from millpond.exceptions import BrokerError, PublishError
from millpond.wire.protocol import DEATH_REASON, DELIVERY_COUNT, Message
from millpond_broker_amqp import frames, native_delay
from millpond_broker_amqp.codec import BROKER_HEADERS, from_properties, undecodable
from millpond_broker_amqp.connection import (
    abandon,
    bounded,
    close_gracefully,
    describe,
    is_transient,
    open_connection,
)
from millpond_broker_amqp.topology import DELAY_ETA, DELAY_TARGET, RESOLUTION_MS, declare_queue
from millpond_broker_amqp.wire import decode_properties

if TYPE_CHECKING:
    from millpond_broker_amqp.broker import AmqpBroker

log = logging.getLogger("millpond.broker.amqp")

_RECV_SIZE = 256 * 1024
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError)
_EARLY = RESOLUTION_MS / 1000  # a delayed message arriving sooner than this before its eta is due
#: at most one ack probe per this many seconds (RabbitMQ's cost is ~30 us of CPU each)
_PROBE_GAP = 0.01


class Pulse(threading.Thread):
    """Serves AMQP heartbeats (and reads the socket) while the consumer loop is busy elsewhere."""

    def __init__(self, consumer: AmqpConsumer, interval: float) -> None:
        super().__init__(name="millpond-amqp-heartbeat", daemon=True)
        self._consumer = consumer
        self._interval = interval
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self._interval):
            self._consumer._pulse()

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout=5)


class AmqpConsumer(Consumer):
    """Consumes a set of queues on one connection and one channel (see the module docstring)."""

    def __init__(self, broker: AmqpBroker, queues: Sequence[str], prefetch: int) -> None:
        if isinstance(queues, str):
            raise TypeError(f"queues must be a sequence of names, not the string {queues!r}")
        if not queues:
            raise ValueError("a consumer needs at least one queue")
        if not isinstance(prefetch, int) or not 1 <= prefetch <= 65535:
            raise ValueError(f"prefetch must be an integer from 1 to 65535, got {prefetch!r}")
        self._broker = broker
        self._settings = broker.settings
        self._queues = tuple(dict.fromkeys(queues))
        self._prefetch = prefetch
        self._lock = threading.Lock()
        self._conn: amqp.Connection | None = None
        self._sock: Any = None
        self._chan_id = 0
        self._gen = 0
        self._queue_of: dict[bytes, str] = {}
        self._pending = b""  # bytes read but not parsed yet (an incomplete frame)
        self._raw: list[frames.RawDelivery] = []
        self._ready: deque[Delivery] = deque()
        self._redelay: list[Delivery] = []
        self._unacked: deque[int] = deque()  # delivery tags of this channel, in delivery order
        self._open: set[int] = set()  # ... of those, the ones not acked or rejected yet
        #: tags acked or rejected on this channel whose arrival is not proven yet, in write order
        self._unproven: deque[int] = deque()
        self._settled = 0  # acks and rejects written on this channel
        self._proven = 0  # ... of which RabbitMQ has shown it has the first `_proven`
        self._probe_covers: int | None = None  # `_settled` when the probe in flight was sent
        self._probe_sent = 0.0
        # RabbitMQ's unacked limit on this channel: channel-wide, or per consumer (quorum)
        self._limit = prefetch * (len(self._queues) if broker.settings.quorum else 1)
        self._in_fetch = False
        self._broken: BaseException | None = None
        self._outage_since: float | None = None
        self._retry_at = 0.0
        self._backoff = 0.1
        self._closed = False
        self._pulse_thread: Pulse | None = None
        #: when the heartbeat thread last served the connection (monotonic)
        self._pulsed_at = time.monotonic()
        with self._lock:
            self._connect()
        if self._conn is not None and self._conn.heartbeat:
            self._pulse_thread = Pulse(self, max(0.2, self._conn.heartbeat / 4))
            self._pulse_thread.start()

    def __repr__(self) -> str:
        return f"AmqpConsumer({self._settings.safe_url!r}, queues={list(self._queues)!r})"

    @property
    def generation(self) -> int:
        """Counts connections opened; changes whenever the consumer reconnected."""
        return self._gen

    # -- connection ------------------------------------------------------------------------------
    def _connect(self) -> None:
        """Open, declare, set QoS and consume (lock held); raises `BrokerError`."""
        settings = self._settings
        conn = open_connection(settings, heartbeat=settings.heartbeat, purpose="consumer")
        try:
            with bounded(conn, self._settings.operation_timeout):
                chan = conn.channel()
                chan.auto_decode = False
                for queue in self._queues:
                    declare_queue(chan, queue, self._settings)
                # a channel-wide limit keeps the total under `prefetch` across all the queues;
                # quorum queues only support per-consumer limits
                chan.basic_qos(0, self._prefetch, not self._settings.quorum)
                # answers read by py-amqp itself (while it waits for a reply of its own)
                chan._callbacks[spec.Basic.QosOk] = self._on_probe_answered
                self._gen += 1
                self._conn, self._sock, self._chan_id = conn, conn.transport.sock, chan.channel_id
                self._queue_of = {}
                self._reset_window()
                for i, queue in enumerate(self._queues):
                    tag = f"millpond-{uuid.uuid4().hex[:12]}-{i}"
                    self._queue_of[tag.encode()] = queue
                    chan.basic_consume(queue, consumer_tag=tag, callback=self._on_slow_delivery)
        except BrokerError:
            self._conn = None
            abandon(conn)
            raise
        except Exception as exc:
            self._conn = None
            abandon(conn)
            raise BrokerError(
                f"cannot start consuming {list(self._queues)} on RabbitMQ at "
                f"{self._settings.safe_url}: {describe(exc)}"
            ) from exc
        # anything py-amqp read past consume-ok is ours now
        self._pending = conn.transport._read_buffer
        conn.transport._read_buffer = b""
        self._broken = None

    def _reset_window(self) -> None:
        self._ready.clear()
        self._redelay.clear()
        self._unacked.clear()
        self._open.clear()
        self._unproven.clear()
        self._settled = self._proven = 0
        self._probe_covers = None
        self._pending = b""

    # -- proving acks arrived ----------------------------------------------------------------------
    def _written(self, tags: Sequence[int] | set[int]) -> None:
        """Acks or rejects of `tags` were just written (lock held): unproven until shown."""
        self._unproven.extend(tags)
        self._settled += len(tags)

    def _prove(self, count: int) -> None:
        """RabbitMQ has the first `count` acks and rejects written on this channel."""
        while self._proven < count and self._unproven:
            self._unproven.popleft()
            self._proven += 1

    def _probe_due(self) -> float:
        """Seconds until a probe may go out (0: now), or -1 when none is needed (lock held)."""
        if not self._unproven or self._probe_covers is not None:
            return -1.0
        return max(0.0, self._probe_sent + _PROBE_GAP - time.monotonic())

    def _probe(self) -> list[bytes]:
        """The probe frame, if one is due now (lock held)."""
        if self._probe_due() != 0.0:
            return []
        self._probe_covers = self._settled
        self._probe_sent = time.monotonic()
        return [frames.qos_frame(self._chan_id, self._prefetch, not self._settings.quorum)]

    def _on_probe_answered(self) -> None:
        """`qos-ok` for the probe in flight (read under the lock): the acks before it arrived."""
        if self._probe_covers is not None:
            self._prove(self._probe_covers)
            self._probe_covers = None

    def _lost(self, exc: BaseException) -> None:
        """Forget a dead connection (lock held); its deliveries come back from RabbitMQ."""
        conn, self._conn, self._sock = self._conn, None, None
        never, unproven = len(self._open), len(self._unproven)
        held = never + unproven
        self._reset_window()
        self._broken = None
        abandon(conn)
        if self._outage_since is None:
            self._outage_since = time.monotonic()
        log.warning(
            "lost the consumer connection to RabbitMQ at %s (%s); reconnecting. RabbitMQ "
            "redelivers the %d deliveries it never saw acknowledged (%d never acknowledged, %d "
            "acknowledged into the lost connection); acks for them are dropped.",
            self._settings.safe_url,
            describe(exc),
            held,
            never,
            unproven,
        )

    def _reconnect(self, deadline: float, waker: Waker | None) -> bool:
        """One reconnection attempt, or a wait for the next one; True when connected."""
        now = time.monotonic()
        if now < self._retry_at:
            wait = min(self._retry_at, deadline) - now
            if wait > 0:
                if waker is not None:
                    waker.wait(wait)
                else:
                    time.sleep(wait)  # waiting for the next reconnect attempt, not synchronising
            return False
        try:
            with self._lock:
                self._connect()
        except BrokerError as exc:
            if not is_transient(exc):
                raise
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self._settings.reconnect_max_delay)
            log.debug("RabbitMQ still unreachable (%s); next attempt in %.1fs", exc, self._backoff)
            return False
        since = self._outage_since or time.monotonic()
        self._outage_since = None
        self._backoff = 0.1
        log.warning(
            "reconnected to RabbitMQ at %s after %.1fs; consuming %s again",
            self._settings.safe_url,
            time.monotonic() - since,
            list(self._queues),
        )
        return True

    # -- reading ---------------------------------------------------------------------------------
    def _read(self) -> None:
        """Read whatever the socket holds, without blocking, and parse it (lock held)."""
        sock = self._sock
        chunks: list[bytes] = []
        tls = self._settings.tls is not None
        sock.setblocking(False)
        try:
            while True:
                try:
                    data = sock.recv(_RECV_SIZE)
                except _WOULD_BLOCK:
                    break
                except InterruptedError:
                    continue
                if not data:
                    raise ConnectionResetError("RabbitMQ closed the connection")
                chunks.append(data)
                if len(data) < _RECV_SIZE and not tls:
                    break
        finally:
            sock.setblocking(True)
        if not chunks:
            return
        conn = self._conn
        assert conn is not None
        conn.bytes_recv += 1
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if self._pending:
            data = self._pending + data
        self._parse(conn, data)

    def _parse(self, conn: amqp.Connection, data: bytes) -> None:
        raw = self._raw
        pos = 0
        while True:
            pos, frame, _heartbeats, proofs = frames.parse(data, pos, self._chan_id, raw)
            for _ in range(proofs):
                self._on_probe_answered()
            if raw:
                for item in raw:
                    self._accept_raw(item)
                raw.clear()
            if frame is None:
                break
            # py-amqp handles this frame; it may wait for a reply, so it gets the rest of the bytes
            transport = conn.transport
            transport._read_buffer = data[pos:]
            with bounded(conn, self._settings.operation_timeout):
                conn.on_inbound_frame(frame)
            data, pos = transport._read_buffer, 0
            transport._read_buffer = b""
        self._pending = data[pos:]

    def _accept_raw(self, raw: frames.RawDelivery) -> None:
        try:
            props = decode_properties(raw.header, 12)
            message = from_properties(props, raw.body)
        except Exception as exc:
            log.warning(
                "delivery %d has corrupt AMQP properties (%s); handing it over as undecodable",
                raw.delivery_tag,
                exc,
            )
            message = undecodable(raw.body, f"AMQP properties cannot be decoded: {exc}")
        self._accept(raw.consumer_tag, raw.delivery_tag, raw.redelivered, message)

    def _on_slow_delivery(self, msg: amqp.Message) -> None:
        """py-amqp's path for a delivery (while it waits for a reply of its own)."""
        if self._conn is None:
            return
        info = msg.delivery_info
        body = msg.body if isinstance(msg.body, bytes) else bytes(msg.body, "utf-8")
        message = from_properties(msg.properties, body)
        self._accept(
            str(info["consumer_tag"]).encode(), info["delivery_tag"], info["redelivered"], message
        )

    def _accept(self, consumer_tag: bytes, tag: int, redelivered: bool, message: Message) -> None:
        headers = message.headers
        delayed = DELAY_TARGET in headers
        if delayed:
            for name in (DELAY_TARGET, *BROKER_HEADERS):
                headers.pop(name, None)
        elif native_delay.came_through(headers):
            # dead-lettering down Celery's delay levels left its trail; the task never sees it
            for name in BROKER_HEADERS - {"x-delivery-count"}:
                headers.pop(name, None)
        # earlier deliveries: of the copies we republished on requeue (our header), then of
        # this copy (quorum queues count them exactly, classic ones only flag them)
        prior = headers.get(DELIVERY_COUNT)
        count = prior if isinstance(prior, int) and prior > 0 else 0
        returned = headers.get("x-delivery-count")
        if isinstance(returned, int) and not isinstance(returned, bool) and returned >= 0:
            count += 1 + returned
        else:
            count += 2 if redelivered else 1
        redelivered = redelivered or count > 1
        queue = self._queue_of.get(consumer_tag) or self._queues[0]
        delivery = Delivery(message, queue, (self._gen, tag), redelivered, count)
        if self._unproven:  # sent while fewer than `limit` were unacked: the window proves acks
            self._prove(tag - self._limit)
        self._unacked.append(tag)
        self._open.add(tag)
        if delayed:
            eta = headers.get(DELAY_ETA)
            if isinstance(eta, int | float) and eta - time.time() > _EARLY:
                self._redelay.append(delivery)  # longer than one trip down the delay ladder
                return
            headers.pop(DELAY_ETA, None)
        self._ready.append(delivery)

    # -- the Consumer contract -------------------------------------------------------------------
    def fetch(self, max_count: int, timeout: float, waker: Waker | None = None) -> list[Delivery]:
        if self._closed:
            raise BrokerError("fetch() on a closed AMQP consumer; create a new consumer")
        if max_count <= 0:
            return []
        deadline = time.monotonic() + max(0.0, timeout)
        self._in_fetch = True
        try:
            while True:
                if self._redelay:
                    self._send_round_again()
                if self._ready:
                    return self._take(max_count)
                if self._conn is None and not self._reconnect(deadline, waker):
                    if time.monotonic() >= deadline or (waker is not None and waker.is_set):
                        return []
                    continue
                with self._lock:
                    if self._broken is not None:
                        self._lost(self._broken)
                        continue
                    try:
                        self._read()
                    except Exception as exc:
                        if not is_transient(exc) and not isinstance(exc, amqp.AMQPError):
                            raise
                        self._lost(exc)
                        continue
                    self._write(self._probe())  # if one is due
                if self._ready or self._redelay:
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                due = self._probe_due()  # nothing to read: wake for the next probe, if needed
                wait = remaining if due < 0 else min(remaining, due)
                if not _socket_wait(self._sock, waker, wait):
                    if wait < remaining and not (waker is not None and waker.is_set):
                        continue
                    return []
        finally:
            self._in_fetch = False

    def _take(self, max_count: int) -> list[Delivery]:
        with self._lock:
            ready = self._ready
            if len(ready) <= max_count:
                out = list(ready)
                ready.clear()
                return out
            return [ready.popleft() for _ in range(max_count)]

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        with self._lock:
            gen = self._gen
            tags = {d.tag[1] for d in deliveries if d.tag[0] == gen} & self._open
            if tags and self._conn is not None:
                acks = self._settle(tags)
                self._written(tags)
                self._write(acks + self._probe())

    def _settle(self, tags: set[int]) -> list[bytes]:
        """Mark `tags` settled; the ack frames that do it: one `multiple` ack for the contiguous
        run at the front of the window, one ack each for the rest (lock held)."""
        open_ = self._open
        open_ -= tags
        unacked = self._unacked
        highest = -1
        while unacked and unacked[0] not in open_:
            tag = unacked.popleft()
            if tag in tags:
                highest = tag
        chan = self._chan_id
        out = [frames.ack_frame(chan, highest, True)] if highest >= 0 else []
        out.extend(frames.ack_frame(chan, tag, False) for tag in tags if tag > highest)
        return out

    def _write(self, chunks: list[bytes]) -> None:
        """Send frames in one write (lock held); a failure is a lost connection, not an error."""
        conn = self._conn
        if not chunks or conn is None:
            return
        try:
            conn.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            conn.bytes_sent += 1
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._lost(exc)

    def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        gen, tag = delivery.tag
        if gen != self._gen or tag not in self._open:
            log.debug("dropping reject of delivery %s from an earlier connection", delivery.tag)
            return
        if self._broken is not None:
            # the connection is being given up: RabbitMQ redelivers the message itself, and a
            # copy published now would make it two
            log.debug("dropping reject of delivery %s on a broken connection", delivery.tag)
            return
        message = delivery.message
        if requeue:
            target = delivery.queue
            headers = _copy_headers(message, {DELIVERY_COUNT: delivery.delivery_count})
        else:
            target = dead_letter_queue(delivery.queue)
            headers = _copy_headers(
                message,
                {DEATH_REASON: reason or "rejected", DELIVERY_COUNT: delivery.delivery_count},
            )
        try:
            self._broker._publish_copy(target, message, headers, declare=requeue)
        except PublishError as exc:
            log.warning(
                "could not move delivery %s to %s (%s); giving it back to %s instead",
                delivery.tag,
                target,
                exc,
                delivery.queue,
            )
            self._settle_one(delivery, requeue_in_place=True)
            return
        self._settle_one(delivery, requeue_in_place=False)

    def _settle_one(self, delivery: Delivery, *, requeue_in_place: bool) -> None:
        gen, tag = delivery.tag
        with self._lock:
            if gen != self._gen or tag not in self._open or self._conn is None:
                return
            if not requeue_in_place:
                acks = self._settle({tag})
                self._written((tag,))
                self._write(acks + self._probe())
                return
            self._open.discard(tag)
            self._written((tag,))  # a reject has no reply either: proven like an ack
            conn = self._conn
            try:
                with bounded(conn, self._settings.operation_timeout):
                    conn.channels[self._chan_id].basic_reject(tag, requeue=True)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._lost(exc)
                return
            self._write(self._probe())

    def _send_round_again(self) -> None:
        """Delayed messages that arrived before their eta (delays over one trip down the ladder)."""
        pending, self._redelay = self._redelay, []
        for delivery in pending:
            eta = delivery.message.headers.pop(DELAY_ETA, None)
            copy = Message(
                body=delivery.message.body,
                headers=_copy_headers(delivery.message, {}),
                content_type=delivery.message.content_type,
                content_encoding=delivery.message.content_encoding,
                properties=delivery.message.properties,
            )
            try:
                self._broker.publish(delivery.queue, copy, eta=float(eta) if eta else None)
            except PublishError as exc:
                log.warning("could not delay %s again (%s); it stays unacked", delivery.tag, exc)
                self._settle_one(delivery, requeue_in_place=True)
                continue
            self._settle_one(delivery, requeue_in_place=False)

    def resize(self, prefetch: int) -> bool:
        """A new channel-wide QoS window (basic.qos on the live channel; a reconnect uses it
        too). Quorum queues take per-consumer limits, which only new consumers get: False."""
        if self._settings.quorum or not 1 <= prefetch <= 65535:
            return False
        with self._lock:
            self._prefetch = prefetch
            conn = self._conn
            if conn is None:
                return True  # the next connection sets it
            # py-amqp reads the reply itself: it gets the bytes not parsed yet, and deliveries
            # that arrive before qos-ok take its slow path, as during `_connect`
            transport = conn.transport
            transport._read_buffer, self._pending = self._pending, b""
            try:
                with bounded(conn, self._settings.operation_timeout):
                    conn.channels[self._chan_id].basic_qos(0, prefetch, True)
            except Exception as exc:
                if not is_transient(exc) and not isinstance(exc, amqp.AMQPError):
                    raise
                self._lost(exc)  # reconnecting sets the new window
                return True
            self._pending, transport._read_buffer = transport._read_buffer, b""
        return True

    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Cancel the subscriptions first (basic.cancel, the channel stays open for the running
        tasks' acks): otherwise each message given back frees a slot of the QoS window and
        RabbitMQ pushes the next one (or the same one) to this consumer, where it would wait
        for the close. Then give back the worker's deliveries and any pushed meanwhile."""
        self._stop_consuming()
        super().release([*deliveries, *self._take(len(self._ready))])

    def _stop_consuming(self) -> None:
        with self._lock:
            conn = self._conn
            if conn is None or self._broken is not None:
                return  # nothing delivered on this connection survives it anyway
            # py-amqp reads the cancel-ok itself: as in `resize`, deliveries before it take
            # the slow path into `_ready`
            transport = conn.transport
            transport._read_buffer, self._pending = self._pending, b""
            try:
                with bounded(conn, self._settings.operation_timeout):
                    chan = conn.channels[self._chan_id]
                    for tag in self._queue_of:
                        chan.basic_cancel(tag.decode())
            except Exception as exc:
                if not is_transient(exc) and not isinstance(exc, amqp.AMQPError):
                    raise
                self._lost(exc)
                return
            self._pending, transport._read_buffer = transport._read_buffer, b""

    @property
    def connected(self) -> bool:
        """False while the consumer connection is lost and being re-established (for /readyz)."""
        return self._conn is not None and not self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pulse_thread is not None:
            self._pulse_thread.stop()
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.transport._read_buffer = self._pending + conn.transport._read_buffer
            self._reset_window()
            close_gracefully(conn, min(2.0, self._settings.operation_timeout))

    # -- heartbeat thread ------------------------------------------------------------------------
    def _pulse(self) -> None:
        with self._lock:
            conn = self._conn
            if conn is None or self._broken is not None or self._closed:
                return
            try:
                if not self._in_fetch:
                    self._read()
                    self._write(self._probe())
                conn.heartbeat_tick(rate=2)
                self._pulsed_at = time.monotonic()
            except Exception as exc:
                self._broken = exc  # the loop thread reconnects on its next fetch

    def stale(self, delivery: Delivery) -> bool:
        """Delivered on a connection that is gone or about to be: an earlier generation, one
        found broken, or one nobody served for longer than the heartbeat timeout (the process
        was stalled: RabbitMQ has closed it, or soon will, and redelivers what it held)."""
        gen = delivery.tag[0] if isinstance(delivery.tag, tuple) else self._gen
        if gen != self._gen or self._broken is not None:
            return True
        conn = self._conn
        timeout = conn.heartbeat if conn is not None else 0
        silent = time.monotonic() - self._pulsed_at
        if timeout and silent > timeout:
            # give the connection up now: RabbitMQ requeues all it held, and the next fetch
            # reconnects (a reject written into it would copy a message RabbitMQ redelivers)
            self._broken = ConnectionError(
                f"the connection was not served for {silent:.1f} s, past its {timeout} s "
                "heartbeat timeout (was the process stalled?)"
            )
            return True
        return False


def _copy_headers(message: Message, updates: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in message.headers.items() if k not in BROKER_HEADERS}
    out.update(updates)
    return out


def _socket_wait(sock: Any, waker: Waker | None, timeout: float) -> bool:
    """Wait until `sock` is readable or `waker` fires; returns True when the socket is readable."""
    fds: list[Any] = [sock]
    if waker is not None:
        if waker.is_set:
            return False
        fds.append(waker)
    try:
        ready, _, _ = select.select(fds, [], [], timeout)
    except (OSError, ValueError):
        return False
    return any(r is sock for r in ready)
