"""The `rpc://` result backend: each result goes back to the process that sent the task, over
RabbitMQ, laid out the way Celery's rpc backend lays it out, so either side can be the caller.

On the wire:

* the caller has one **reply queue** per process and backend: named by an oid (a UUID of the host,
  the process and the backend instance, as Celery names its reply queue), declared durable and
  auto-delete, not exclusive, with `x-expires` = `result_expires` (Celery's declaration), on the
  default exchange. It is declared, and consumed, before the first task that keeps its result is
  sent, and its name goes out as the task message's `reply_to` property;
* the worker publishes each state it stores (RETRY, then the outcome) to the default exchange with
  the `reply_to` as routing key: `correlation_id` = the task id, JSON, not persistent (Celery's
  `result_persistent` default), the body Celery's rpc backend reads (`task_id`, `status`,
  `result`, `traceback`, `children`, `date_done`, plus `name` and `retries`).

On the caller's side the reply connection (its own, heartbeats off, like the publishing link) is
read only by a thread that waits: `get` blocks on the socket, never polls. The first waiter reads
for everyone; whatever arrives is filed by task id, so results of other tasks that come first are
kept for their own handles (at most `BUFFER_LIMIT` of them; beyond it the oldest go, with a
warning). `peek` files what has already arrived, without waiting.

What rpc:// cannot do, and says so: read a result from any process but the one that sent the task
(`millpond result <id>` elsewhere), join chords, save groups. A result sent while the caller's
reply connection is down is lost: RabbitMQ deletes an auto-delete queue with its last consumer.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import ssl
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import amqp
from amqp import exceptions as amqp_exc

from millpond.contracts.backend import ChordPart, ResultBackend, ResultMeta
from millpond.contracts.broker import Broker
from millpond.exceptions import BackendError, BrokerError, ConfigurationError, NotSupported
from millpond.states import READY_STATES
from millpond_broker_amqp.broker import AmqpBroker
from millpond_broker_amqp.connection import (
    TRANSIENT,
    abandon,
    bounded,
    close_gracefully,
    describe,
    is_transient,
    open_connection,
    tls_pending,
)
from millpond_broker_amqp.link import Unroutable
from millpond_broker_amqp.settings import AmqpConfig

log = logging.getLogger("millpond.backend.rpc")

#: results a process keeps for handles that have not asked for them yet; beyond it the oldest go
BUFFER_LIMIT = 10_000
JSON = "application/json"
#: Celery's default: results are transient messages (`result_persistent = False`)
DELIVERY_MODE = 1

_SHARED_STORE = "redis://host:6379/0 (pip install millpond-broker-redis)"
_NOT_SENT_HERE = (
    "rpc:// sends a task's result only to the process that sent the task, and this process has "
    "sent none, so task {task_id} cannot be read here (millpond result, or app.AsyncResult(id) "
    "in another process). Read it in the process that sent it, or use a result backend any "
    f"process can read, such as {_SHARED_STORE}"
)
_NO_CHORDS = (
    "rpc:// cannot join chords: each result goes only to the process that sent the task, and "
    f"nothing is stored where a worker could count the header's parts; use {_SHARED_STORE} or "
    "the embedded sqlite:// as result_backend"
)
_NO_GROUPS = (
    "rpc:// cannot save groups: results are messages to their caller, not stored by id; use "
    f"{_SHARED_STORE} as result_backend to save and restore a group"
)


def reply_queue_name(instance: object) -> str:
    """The oid naming a reply queue: a UUID of this host, this process and `instance`."""
    entity = f"{uuid.getnode():x}-{os.getpid():x}-0-{id(instance):x}"
    return str(uuid.uuid3(uuid.NAMESPACE_OID, entity))


def encode_reply(meta: ResultMeta) -> amqp.Message:
    """The result message a worker sends to the caller's reply queue (Celery's layout); raises
    `TypeError`/`ValueError` for a result JSON cannot hold."""
    body = json.dumps(meta.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
    return amqp.Message(
        body,
        content_type=JSON,
        content_encoding="utf-8",
        correlation_id=meta.task_id,
        delivery_mode=DELIVERY_MODE,
    )


def decode_reply(properties: Mapping[str, Any], body: bytes) -> ResultMeta:
    """A result message read from a reply queue; raises `ValueError` for one that is not a
    result in JSON."""
    content_type = str(properties.get("content_type") or "").split(";")[0].strip().lower()
    if content_type != JSON:
        raise ValueError(
            f"its content type is {content_type or '(none)'!r}; only JSON results are read "
            "(Celery's result_serializer = 'json', the default)"
        )
    try:
        data = json.loads(body.decode(str(properties.get("content_encoding") or "utf-8")))
    except (UnicodeDecodeError, LookupError, RecursionError, ValueError) as exc:
        raise ValueError(f"its body is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("status"), str):
        raise ValueError("its body is not a result (an object with a 'status')")
    task_id = data.get("task_id") or properties.get("correlation_id")
    if not isinstance(task_id, str) or not task_id:
        raise ValueError("it names no task (no 'task_id', no correlation_id)")
    try:
        return ResultMeta.from_json({**data, "task_id": task_id})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"its fields have the wrong types: {exc}") from None


class RpcResultBackend(ResultBackend):
    """`rpc://`: results go to the caller's reply queue on the app's RabbitMQ broker."""

    replies_to_caller = True
    supports_chords = False

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        parts = urlsplit(url)
        if parts.scheme != "rpc" or parts.netloc or parts.path not in ("", "/") or parts.query:
            raise ConfigurationError(
                f"result_backend {url!r}: rpc:// takes no host, path or options; the results "
                "travel over the broker (broker_url), so write just rpc://"
            )
        expires = self.options.get("result_expires")
        if expires is not None and (
            isinstance(expires, bool) or not isinstance(expires, int | float) or expires <= 0
        ):
            raise ConfigurationError(
                f"result_expires must be a positive number of seconds, got {expires!r}"
            )
        self.expires: float | None = float(expires) if expires is not None else None
        self._broker: AmqpBroker | None = None
        self._replies: _Replies | None = None
        self._lock = threading.Lock()
        #: reply queues found missing lately (warned about once each)
        self._gone: OrderedDict[str, None] = OrderedDict()

    def __repr__(self) -> str:
        return "RpcResultBackend('rpc://')"

    def bind_broker(self, broker: Broker) -> None:
        if not isinstance(broker, AmqpBroker):
            raise ConfigurationError(
                f"result_backend rpc:// sends results over RabbitMQ, but the broker is {broker!r}; "
                "set broker_url to amqp://..., or leave result_backend unset to use the broker's "
                "own result store"
            )
        self._broker = broker

    def _amqp(self) -> AmqpBroker:
        if self._broker is None:
            raise ConfigurationError(
                "the rpc:// backend has no broker: it is given the app's broker when the app "
                "creates it (Millpond(..., result_backend='rpc://')), or call bind_broker(broker)"
            )
        return self._broker

    def _here(self) -> _Replies:
        """This process's reply queue and its consumer (a forked child makes its own)."""
        replies = self._replies
        if replies is not None and replies.pid == os.getpid():
            return replies
        with self._lock:
            replies = self._replies
            if replies is None or replies.pid != os.getpid():
                if replies is not None:
                    replies.forget_parent()
                replies = _Replies(self._amqp().settings, reply_queue_name(self), self.expires)
                self._replies = replies
        return replies

    # -- the worker's side ------------------------------------------------------------------------
    def store(self, meta: ResultMeta) -> None:
        """Send the state to the caller's reply queue (nothing when the task has no `reply_to`:
        its caller asked for no result)."""
        reply_to = meta.reply_to
        if not reply_to:
            log.debug("task %s has no reply_to; its %s is not sent", meta.task_id, meta.status)
            return
        message = encode_reply(meta)
        try:
            self._amqp()._link.publish(
                message,
                exchange="",
                routing_key=reply_to,
                describe_target=f"the reply queue {reply_to!r}",
            )
        except Unroutable:
            gone = self._gone
            level = logging.DEBUG if reply_to in gone else logging.WARNING
            gone[reply_to] = None
            while len(gone) > 1000:
                gone.popitem(last=False)
            log.log(
                level,
                "the reply queue %s of task %s does not exist (the process that sent the task "
                "has gone or lost its connection, or it does not read rpc:// results); its %s "
                "is dropped",
                reply_to,
                meta.task_id,
                meta.status,
            )

    # -- the caller's side ------------------------------------------------------------------------
    def reply_to(self, task_id: str) -> str:
        return self._here().listen()

    def get(self, task_id: str, timeout: float | None) -> ResultMeta | None:
        replies = self._here()
        replies.check_readable(task_id)
        return replies.wait(task_id, timeout)

    def peek(self, task_id: str) -> ResultMeta | None:
        replies = self._here()
        replies.check_readable(task_id)
        return replies.peek(task_id)

    def forget(self, task_id: str) -> None:
        """Drop what this process holds for the task (nothing is stored anywhere else)."""
        replies = self._replies
        if replies is not None and replies.pid == os.getpid():
            replies.forget(task_id)

    def close(self) -> None:
        """Close the reply connection: RabbitMQ deletes the reply queue with its consumer."""
        with self._lock:
            replies, self._replies = self._replies, None
        if replies is not None:
            if replies.pid == os.getpid():
                replies.close()
            else:
                replies.forget_parent()

    # -- what rpc cannot do -----------------------------------------------------------------------
    def set_chord_size(self, group_id: str, size: int) -> None:
        raise NotSupported(_NO_CHORDS)

    def chord_part_return(
        self, group_id: str, task_id: str, index: int | None, state: str, result: Any
    ) -> list[ChordPart] | None:
        raise NotSupported(_NO_CHORDS)

    def chord_done(self, group_id: str) -> None:
        raise NotSupported(_NO_CHORDS)

    def chord_release(self, group_id: str) -> None:
        raise NotSupported(_NO_CHORDS)

    def save_group(self, group_id: str, value: Any) -> None:
        raise NotSupported(_NO_GROUPS)

    def restore_group(self, group_id: str) -> Any:
        raise NotSupported(_NO_GROUPS)

    def forget_group(self, group_id: str) -> None:
        """Nothing to delete: a group is never stored (its members are forgotten one by one)."""


@dataclass(slots=True)
class _Entry:
    meta: ResultMeta
    ready: bool
    #: handed to a caller at least once (an unseen ready result dropped from the buffer is lost)
    seen: bool = False


class _Replies:
    """One process's reply queue: its connection, its consumer, and the results read from it.

    Locks: `_io` is held by whoever uses the connection (one reader at a time); `_cond` guards
    the results and the `_reading` flag, and is never held while waiting for `_io`.
    """

    def __init__(self, settings: AmqpConfig, name: str, expires: float | None) -> None:
        self.settings = settings
        self.name = name
        self.pid = os.getpid()
        self._arguments = {"x-expires": max(1, round(expires * 1000))} if expires else None
        self._io = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._results: OrderedDict[str, _Entry] = OrderedDict()
        self._reading = False
        self._conn: amqp.Connection | None = None
        self._cancelled = False
        #: the queue has been declared and consumed at least once (a task was sent)
        self.listening = False
        self._closed = False
        self._retry_at = 0.0
        self._backoff = 0.1
        self._down_since: float | None = None
        self._dropped = 0
        self._warned: set[str] = set()

    # -- lifecycle --------------------------------------------------------------------------------
    def forget_parent(self) -> None:
        """In a forked child: release the parent's socket without touching the connection."""
        conn, self._conn = self._conn, None
        abandon(conn)

    def close(self) -> None:
        self._closed = True
        conn = self._conn
        if not self._io.acquire(blocking=False):
            # a reader waits on the socket: wake it (its read fails and it sees `_closed`)
            sock = getattr(getattr(conn, "transport", None), "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if not self._io.acquire(timeout=self.settings.operation_timeout):
                return
        try:
            conn, self._conn = self._conn, None
            close_gracefully(conn, min(2.0, self.settings.operation_timeout))
        finally:
            self._io.release()
        with self._cond:
            self._cond.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError("the rpc:// result backend was closed; results cannot be read")

    # -- producer side ----------------------------------------------------------------------------
    def listen(self) -> str:
        """Make sure the reply queue exists and is consumed; its name. Called before each send:
        then it only checks, without waiting, that the connection is still there."""
        self._check_open()
        if not self._io.acquire(blocking=not self.listening):
            return self.name  # a waiting thread reads the connection and notices if it drops
        try:
            if self._conn is not None:
                self._check_alive()
            if self._conn is None:
                self._open_retrying()
        finally:
            self._io.release()
        self.listening = True
        return self.name

    def check_readable(self, task_id: str) -> None:
        self._check_open()
        if self.listening:
            return
        with self._cond:
            if task_id in self._results:
                return
        raise NotSupported(_NOT_SENT_HERE.format(task_id=task_id))

    # -- the results ------------------------------------------------------------------------------
    def wait(self, task_id: str, timeout: float | None) -> ResultMeta | None:
        """Until the task's result is here or `timeout` passes; the newest state known."""
        if timeout is not None and timeout <= 0:
            return self.peek(task_id)  # what has arrived, without waiting
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                while True:
                    entry = self._results.get(task_id)
                    if entry is not None and entry.ready:
                        entry.seen = True
                        return entry.meta
                    left = None if deadline is None else deadline - time.monotonic()
                    if (left is not None and left <= 0) or self._closed:
                        self._check_open()
                        return entry.meta if entry is not None else None
                    if not self._reading:
                        self._reading = True  # this thread reads for everyone until it returns
                        break
                    self._cond.wait(left)
            try:
                with self._io:
                    self._read(left)
            finally:
                with self._cond:
                    self._reading = False
                    self._cond.notify_all()

    def peek(self, task_id: str) -> ResultMeta | None:
        """The newest state that has reached this process, without waiting for more."""
        if self._io.acquire(blocking=False):  # else a waiting thread is reading right now
            try:
                if self._conn is None and self.listening and time.monotonic() >= self._retry_at:
                    self._reconnect()
                if self._conn is not None:
                    self._drain(0.0)
            finally:
                self._io.release()
        with self._cond:
            entry = self._results.get(task_id)
            if entry is None:
                return None
            entry.seen = entry.seen or entry.ready
            return entry.meta

    def forget(self, task_id: str) -> None:
        with self._cond:
            self._results.pop(task_id, None)

    def _file(self, meta: ResultMeta) -> None:
        ready = meta.status in READY_STATES
        with self._cond:
            results = self._results
            known = results.get(meta.task_id)
            if known is not None and known.ready and not ready:
                return  # a late RETRY (its worker stored it after the retry had finished)
            results[meta.task_id] = _Entry(meta, ready)
            results.move_to_end(meta.task_id)
            while len(results) > BUFFER_LIMIT:
                _, old = results.popitem(last=False)
                if old.ready and not old.seen:
                    self._dropped += 1
                    if self._dropped == 1 or self._dropped % 1000 == 0:
                        log.warning(
                            "rpc:// keeps at most %d results nobody has asked for; dropped the "
                            "result of task %s (%d dropped so far). Read results as they come, "
                            "or send tasks whose results you do not read with ignore_result",
                            BUFFER_LIMIT,
                            old.meta.task_id,
                            self._dropped,
                        )
            self._cond.notify_all()

    # -- the connection (`_io` held) --------------------------------------------------------------
    def _open(self) -> None:
        conn = open_connection(self.settings, heartbeat=0, purpose="rpc replies")
        try:
            with bounded(conn, self.settings.operation_timeout):
                chan = conn.channel()
                chan.auto_decode = False
                chan.queue_declare(
                    self.name,
                    durable=True,
                    auto_delete=True,
                    exclusive=False,
                    arguments=self._arguments,
                )
                chan.basic_consume(
                    self.name,
                    consumer_tag=f"millpond-rpc-{uuid.uuid4().hex[:12]}",
                    no_ack=True,
                    callback=self._on_reply,
                    on_cancel=self._on_cancel,
                )
        except Exception as exc:
            abandon(conn)
            if isinstance(exc, amqp_exc.PreconditionFailed):
                raise BrokerError(
                    f"RabbitMQ refused the reply queue {self.name!r} ({exc.reply_text}); it "
                    "exists with other arguments"
                ) from exc
            if isinstance(exc, BrokerError):
                raise
            raise BrokerError(
                f"cannot declare the rpc:// reply queue on RabbitMQ at {self.settings.safe_url}: "
                f"{describe(exc)}"
            ) from exc
        self._conn = conn
        self._cancelled = False
        if self._down_since is not None:
            log.warning(
                "rpc:// reply connection to RabbitMQ at %s is back after %.1fs; results sent "
                "while it was down are lost",
                self.settings.safe_url,
                time.monotonic() - self._down_since,
            )
            self._down_since = None
        self._backoff = 0.1

    def _open_retrying(self) -> None:
        """Open, retrying while RabbitMQ is unreachable, for `publish_retry_timeout` at most."""
        deadline = time.monotonic() + self.settings.publish_retry_timeout
        delay = 0.05
        while True:
            try:
                self._open()
                return
            except BrokerError as exc:
                if not is_transient(exc) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)  # backoff between reconnection attempts, not synchronisation
            delay = min(delay * 2, 2.0)

    def _reconnect(self) -> None:
        """One attempt; a failure schedules the next one (with backoff) instead of raising."""
        if self._closed:
            return
        try:
            self._open()
        except BrokerError as exc:
            if not is_transient(exc):
                raise
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self.settings.reconnect_max_delay)
            log.debug("rpc:// reply connection still down (%s)", exc)

    def _lost(self, exc: BaseException) -> None:
        conn, self._conn = self._conn, None
        abandon(conn)
        if self._closed:
            return
        if self._down_since is None:
            self._down_since = time.monotonic()
        log.warning(
            "lost the rpc:// reply connection to RabbitMQ at %s (%s); reconnecting. RabbitMQ "
            "deletes the reply queue with its consumer, so results sent until it is back are lost",
            self.settings.safe_url,
            describe(exc),
        )

    def _check_alive(self) -> None:
        """Notice a reply connection RabbitMQ has closed, without reading the results waiting
        on it (nobody may ever ask for them: a worker's own subtasks)."""
        assert self._conn is not None
        sock = self._conn.transport.sock
        if isinstance(sock, ssl.SSLSocket) or not hasattr(socket, "MSG_DONTWAIT"):
            self._drain(0.0)  # TLS cannot peek: read what is there instead
            return
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(exc)
            return
        if not data:
            self._lost(ConnectionResetError("RabbitMQ closed the connection"))

    def _read(self, timeout: float | None) -> None:
        """Read results for up to `timeout` seconds (None: until one comes); returns as soon as
        something was read, or the connection changed."""
        if self._closed:
            return
        if self._conn is None:
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                # the next reconnection attempt is not due yet
                time.sleep(wait if timeout is None else min(wait, max(0.0, timeout)))
                return
            self._reconnect()
            return
        self._drain(timeout)

    def _drain(self, timeout: float | None) -> None:
        """Dispatch the frames that arrive within `timeout` (0: only those already here)."""
        conn = self._conn
        assert conn is not None
        transport = conn.transport
        sock = transport.sock
        wait = timeout
        try:
            while True:
                if not transport._read_buffer and not tls_pending(sock):
                    if wait is not None and wait <= 0:
                        readable, _, _ = select.select([sock], [], [], 0)
                    else:
                        readable, _, _ = select.select([sock], [], [], wait)
                    if not readable:
                        return
                # a frame has begun to arrive: the rest of it may take an exchange's time
                with bounded(conn, self.settings.operation_timeout):
                    conn.drain_events(timeout=self.settings.operation_timeout)
                wait = 0.0  # from now on only what is already here
                if self._cancelled:
                    raise amqp_exc.ConsumerCancelled("RabbitMQ cancelled the reply consumer")
        except (*TRANSIENT, amqp_exc.AMQPError, ValueError) as exc:
            # ValueError: select() on a socket closed under us (close() from another thread)
            self._lost(exc)

    # -- py-amqp callbacks (inside drain_events, `_io` held) -------------------------------------
    def _on_reply(self, message: amqp.Message) -> None:
        body = message.body if isinstance(message.body, bytes) else bytes(message.body, "utf-8")
        try:
            meta = decode_reply(message.properties, body)
        except ValueError as exc:
            key = str(exc)[:60]
            if key not in self._warned:
                self._warned.add(key)
                log.warning(
                    "dropped a message on the rpc:// reply queue %s (correlation_id %s): %s",
                    self.name,
                    message.properties.get("correlation_id"),
                    exc,
                )
            return
        self._file(meta)

    def _on_cancel(self, consumer_tag: str) -> None:
        self._cancelled = True  # the queue was deleted under us: declare and consume again
