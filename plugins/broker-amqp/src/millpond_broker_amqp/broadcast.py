"""Exchanges on RabbitMQ for remote control and events: real exchanges, real bound queues.

Everything is declared with the caller's `Exchange`/`Listen` arguments, which must be the ones
Celery declares (RabbitMQ refuses a second declaration that differs, `PRECONDITION_FAILED`).
Broadcasts go through the broker's confirm channel without `mandatory`: a fanout nobody listens
on, or a reply whose caller has left, is dropped by RabbitMQ, as kombu's pidbox expects.

A listener has a connection of its own (heartbeats off, like the rpc:// reply connection: it is
read only when its thread asks), consumes with `no_ack` (control messages are not redelivered),
and reads the socket only in `receive`, so it never blocks any other thread.
"""

from __future__ import annotations

import logging
import select
import time
import uuid
from typing import TYPE_CHECKING, Any, Final

import amqp
from amqp import exceptions as amqp_exc

from millpond.contracts.broadcast import Exchange, Listen, Received, Subscription
from millpond.exceptions import BrokerError
from millpond_broker_amqp.codec import from_properties
from millpond_broker_amqp.connection import (
    TRANSIENT,
    abandon,
    bounded,
    close_gracefully,
    describe,
    open_connection,
    tls_pending,
)
from millpond_broker_amqp.settings import AmqpConfig

if TYPE_CHECKING:
    from millpond_broker_amqp.broker import AmqpBroker

log = logging.getLogger("millpond.broker.amqp")

_BATCH: Final = 100


def declare_exchange(chan: amqp.Channel, exchange: Exchange) -> None:
    chan.exchange_declare(
        exchange.name,
        exchange.kind,
        durable=exchange.durable,
        auto_delete=exchange.auto_delete,
    )


def queue_arguments(spec: Listen) -> dict[str, Any] | None:
    args: dict[str, Any] = {}
    if spec.message_ttl is not None:
        args["x-message-ttl"] = max(0, round(spec.message_ttl * 1000))
    if spec.expires is not None:
        args["x-expires"] = max(1, round(spec.expires * 1000))
    return args or None


def publish(
    broker: AmqpBroker, exchange: Exchange, message: amqp.Message, routing_key: str
) -> None:
    """Declare the exchange (once per connection) and publish to it, confirmed."""
    target = f"exchange {exchange.name!r}"
    link = broker._link

    def before(chan: amqp.Channel) -> None:
        broker._sync_cache()
        mark = f"exchange:{exchange.name}"
        if mark not in broker._declared:
            declare_exchange(chan, exchange)
            broker._declared.add(mark)

    link.publish(
        message,
        exchange=exchange.name,
        routing_key=routing_key,
        describe_target=target,
        before=before,
        mandatory=False,
    )


class AmqpSubscription(Subscription):
    """A bound queue consumed on a connection of its own."""

    def __init__(self, settings: AmqpConfig, spec: Listen) -> None:
        self.settings = settings
        self.spec = spec
        self._conn: amqp.Connection | None = None
        self._got: list[Received] = []
        self._closed = False
        self._ok = False
        self._cancelled = False
        self._backoff = 0.1
        self._retry_at = 0.0
        self._open()

    def _open(self) -> None:
        spec = self.spec
        conn = open_connection(self.settings, heartbeat=0, purpose=f"listener {spec.queue}")
        try:
            with bounded(conn, self.settings.operation_timeout):
                chan = conn.channel()
                chan.auto_decode = False
                declare_exchange(chan, spec.exchange)
                chan.queue_declare(
                    spec.queue,
                    durable=spec.durable,
                    exclusive=spec.exclusive,
                    auto_delete=spec.auto_delete,
                    arguments=queue_arguments(spec),
                )
                chan.queue_bind(spec.queue, spec.exchange.name, spec.routing_key)
                chan.basic_consume(
                    spec.queue,
                    consumer_tag=f"millpond-listen-{uuid.uuid4().hex[:12]}",
                    no_ack=True,
                    callback=self._on_message,
                    on_cancel=self._on_cancel,
                )
        except Exception as exc:
            abandon(conn)
            if isinstance(exc, BrokerError):
                raise
            if isinstance(exc, amqp_exc.ResourceLocked):
                raise BrokerError(
                    f"the queue {spec.queue!r} is in use by another connection "
                    f"({exc.reply_text}): is a worker with the same node name already running? "
                    "Give each worker a unique name (--hostname)"
                ) from exc
            raise BrokerError(
                f"cannot listen on exchange {spec.exchange.name!r} at RabbitMQ "
                f"{self.settings.safe_url}: {describe(exc)}"
            ) from exc
        self._conn = conn
        self._cancelled = False
        self._ok = True
        self._backoff = 0.1

    def _lost(self, exc: BaseException) -> None:
        if self._ok and not self._closed:
            log.warning(
                "lost the listener on exchange %r at RabbitMQ %s (%s); reconnecting",
                self.spec.exchange.name,
                self.settings.safe_url,
                describe(exc),
            )
        self._ok = False
        conn, self._conn = self._conn, None
        abandon(conn)
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.settings.reconnect_max_delay)

    def receive(self, timeout: float) -> list[Received]:
        if self._closed:
            return []
        if self._conn is None:
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, max(timeout, 0.0)))  # reconnect backoff, bounded by timeout
                return []
            try:
                self._open()
            except BrokerError as exc:
                self._lost(exc)
                return []
        self._drain(timeout)
        got, self._got = self._got, []
        return got

    def _drain(self, timeout: float) -> None:
        conn = self._conn
        assert conn is not None
        transport = conn.transport
        sock = transport.sock
        wait = max(0.0, timeout)
        try:
            while len(self._got) < _BATCH:
                if not transport._read_buffer and not tls_pending(sock):
                    readable, _, _ = select.select([sock], [], [], wait)
                    if not readable:
                        return
                with bounded(conn, self.settings.operation_timeout):
                    conn.drain_events(timeout=self.settings.operation_timeout)
                wait = 0.0
                if self._cancelled:
                    raise amqp_exc.ConsumerCancelled("RabbitMQ cancelled the listener")
        except (*TRANSIENT, amqp_exc.AMQPError, ValueError) as exc:
            self._lost(exc)

    def _on_message(self, message: amqp.Message) -> None:
        body = message.body if isinstance(message.body, bytes) else bytes(message.body, "utf-8")
        info = message.delivery_info or {}
        self._got.append(
            Received(
                from_properties(message.properties, body),
                str(info.get("exchange") or self.spec.exchange.name),
                str(info.get("routing_key") or ""),
            )
        )

    def _on_cancel(self, consumer_tag: str) -> None:
        self._cancelled = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        conn, self._conn = self._conn, None
        close_gracefully(conn, min(2.0, self.settings.operation_timeout))
