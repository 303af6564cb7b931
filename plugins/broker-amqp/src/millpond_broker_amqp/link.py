"""The broker's own connection: publishing with confirms and the administrative calls.

One connection and one channel (in confirm mode) serve every thread of a process, behind a lock:
py-amqp connections are not thread-safe, and a confirm wait is one round trip, so a lock costs
little next to it. After `os.fork()` the child abandons the parent's socket without closing it (the
parent keeps using it) and opens its own on first use. A lost connection is reopened with
exponential backoff for at most `publish_retry_timeout` seconds; a nack, an unroutable message or
an unencodable one fails at once, since retrying cannot help.

Heartbeats are off on this connection: it is often idle, and nobody would serve them while it is.
A dead link is found by the confirm wait's timeout instead, and cured by the retry.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import amqp
from amqp import exceptions as amqp_exc
from amqp import spec

from millpond.exceptions import AccessDenied, BrokerError, PublishAccessDenied, PublishError
from millpond_broker_amqp.connection import (
    abandon,
    bounded,
    close_gracefully,
    describe,
    is_transient,
    open_connection,
)
from millpond_broker_amqp.settings import AmqpConfig

log = logging.getLogger("millpond.broker.amqp")
T = TypeVar("T")

_links: weakref.WeakSet[Link] = weakref.WeakSet()


class Unroutable(PublishError):
    """RabbitMQ returned a mandatory message: no queue is bound to its routing key."""


class Nacked(PublishError):
    """RabbitMQ nacked a publish: it did not store the message. A quorum queue does this while it
    elects a new leader (a cluster node was lost), so `Link.call` sends the message again with
    backoff until `publish_retry_timeout`, and raises this only then."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message of a batch publish: where it goes, and what to declare first."""

    message: amqp.Message
    exchange: str
    routing_key: str
    target: str
    before: Callable[[amqp.Channel], None] | None = None
    #: the task id, so an error names the messages the broker did not take
    task_id: str | None = None

    def describe(self) -> str:
        return f"task {self.task_id} for {self.target}" if self.task_id else self.target


def _listing(names: Iterable[str], most: int = 10) -> str:
    """Names for an error message, the first `most` of them and how many more."""
    shown = list(names)
    more = len(shown) - most
    return ", ".join(shown[:most]) + (f" and {more} more" if more > 0 else "")


def _after_fork_in_child() -> None:
    for link in list(_links):
        link.forget_parent()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Link:
    """A lazily opened, self-healing connection + confirm channel shared by a process's threads."""

    def __init__(self, settings: AmqpConfig, purpose: str = "publisher") -> None:
        self.settings = settings
        self.purpose = purpose
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._conn: amqp.Connection | None = None
        self._chan: amqp.Channel | None = None
        self._returned: tuple[int, str] | None = None
        self._nacked = False
        #: publishes on the current channel (a confirm's delivery tag counts them from 1)
        self._sequence = 0
        #: while a batch waits for its confirms: delivery tag -> the item's index in the batch
        self._awaiting: dict[int, int] = {}
        self._confirmed: set[int] = set()
        self._refused: set[int] = set()
        self._unroutable: list[str] = []
        #: correlation ids (task ids) of the messages of a batch RabbitMQ returned
        self._returned_ids: list[str] = []
        #: bumped on every new connection; users cache per-connection state against it
        self.generation = 0
        self._closed = False
        _links.add(self)

    # -- lifecycle -------------------------------------------------------------------------------
    def forget_parent(self) -> None:
        """In a forked child: drop the parent's connection without touching its socket state."""
        self._lock = threading.RLock()
        self._pid = os.getpid()
        conn, self._conn, self._chan = self._conn, None, None
        if conn is not None:
            abandon(conn)
            self.generation += 1

    def close(self) -> None:
        self._closed = True
        if os.getpid() != self._pid:
            self.forget_parent()
            return
        with self._lock:
            conn, self._conn, self._chan = self._conn, None, None
            close_gracefully(conn, min(2.0, self.settings.operation_timeout))

    def _channel(self) -> amqp.Channel:
        """The open confirm channel, connecting first if needed (lock held)."""
        if self._pid != os.getpid():
            self.forget_parent()
        if self._chan is not None and self._conn is not None:
            return self._chan
        if self._conn is None:
            self._conn = open_connection(self.settings, heartbeat=0, purpose=self.purpose)
            self.generation += 1
        conn = self._conn
        with bounded(conn, self.settings.operation_timeout):
            chan = conn.channel()
            if self.settings.confirm_publish:
                chan.confirm_select()
        chan.events["basic_return"].add(self._on_return)
        chan.events["basic_nack"].add(self._on_nack)
        chan.events["basic_ack"].add(self._on_ack)
        self._sequence = 0
        self._chan = chan
        return chan

    def _drop(self, exc: BaseException) -> None:
        """Forget a broken connection (lock held)."""
        conn, self._conn, self._chan = self._conn, None, None
        if conn is not None:
            log.warning(
                "lost the %s connection to RabbitMQ at %s (%s); reconnecting",
                self.purpose,
                self.settings.safe_url,
                describe(exc),
            )
            abandon(conn)

    def _drop_channel(self) -> None:
        """A channel error closed the channel server-side (py-amqp reopens it at once, without
        confirm mode): close it cleanly and open a fresh one next time (lock held)."""
        chan, self._chan = self._chan, None
        if chan is None or self._conn is None:
            return
        try:
            with bounded(self._conn, self.settings.operation_timeout):
                if chan.is_open:
                    chan.close()
                else:
                    chan.collect()
        except Exception as exc:
            self._drop(exc)

    # -- calls -----------------------------------------------------------------------------------
    def call(self, what: str, fn: Callable[[amqp.Channel], T]) -> T:
        """Run `fn(channel)`, reconnecting and retrying while the failure is transient, for at
        most `publish_retry_timeout` seconds. Raises `BrokerError` (or what `fn` raises)."""
        if self._closed:
            raise BrokerError(f"the AMQP broker was closed; cannot {what}")
        deadline = time.monotonic() + self.settings.publish_retry_timeout
        delay = 0.05
        failure: Exception
        while True:
            with self._lock:
                try:
                    chan = self._channel()
                    with bounded(chan.connection, self.settings.operation_timeout):
                        return fn(chan)
                except Nacked as exc:  # not stored: send it again on a fresh channel, whose
                    failure = exc  # queue clients look the (new) quorum leaders up afresh
                    self._drop_channel()
                    if time.monotonic() >= deadline:
                        raise
                    log.warning(
                        "RabbitMQ nacked (did not store) a message sent to %s; sending what it "
                        "refused again on a fresh channel, until publish_retry_timeout (%gs)",
                        what,
                        self.settings.publish_retry_timeout,
                    )
                except Exception as exc:
                    cause = exc.__cause__ if isinstance(exc, BrokerError) else exc
                    if isinstance(cause, amqp_exc.ChannelError):
                        self._drop_channel()
                    elif is_transient(exc):
                        self._drop(exc)
                    if not is_transient(exc):
                        raise
                    failure = exc
            remaining = deadline - time.monotonic()
            if remaining <= 0 and isinstance(failure, Nacked):
                raise failure
            if remaining <= 0:
                raise BrokerError(
                    f"could not {what} on RabbitMQ at {self.settings.safe_url} within "
                    f"{self.settings.publish_retry_timeout:g}s ({describe(failure)}); is the "
                    "server up? (option publish_retry_timeout)"
                ) from failure
            time.sleep(min(delay, remaining))  # backoff between reconnects, not synchronisation
            delay = min(delay * 2, 2.0)

    def publish(
        self,
        message: amqp.Message,
        *,
        exchange: str,
        routing_key: str,
        describe_target: str,
        before: Callable[[amqp.Channel], None] | None = None,
        mandatory: bool = True,
    ) -> None:
        """Publish and wait for the broker's confirm, retrying on a lost connection; raises
        `PublishError`. `before(channel)` runs first on every attempt (it declares the target
        on a new connection); `describe_target` names the destination in error messages."""

        def attempt(chan: amqp.Channel) -> None:
            if before is not None:
                before(chan)
            self.publish_on(
                chan, message, exchange, routing_key, describe_target, mandatory=mandatory
            )

        try:
            self.call(f"publish to {describe_target}", attempt)
        except PublishError:
            raise
        except AccessDenied as exc:  # credentials or permissions: a publish that never retried
            raise PublishAccessDenied(str(exc)) from exc.__cause__
        except BrokerError as exc:
            raise PublishError(str(exc)) from exc.__cause__
        except amqp_exc.AMQPError as exc:
            raise PublishError(
                f"RabbitMQ rejected the message for {describe_target}: {describe(exc)}"
            ) from exc

    def publish_on(
        self,
        chan: amqp.Channel,
        message: amqp.Message,
        exchange: str,
        routing_key: str,
        describe_target: str,
        *,
        mandatory: bool = True,
    ) -> None:
        """One publish on the link's confirm channel, inside `call` (lock held). Without
        `mandatory` a message no queue takes is dropped by RabbitMQ (broadcasts)."""
        self._returned = None
        self._nacked = False
        try:
            chan.basic_publish(
                message, exchange=exchange, routing_key=routing_key, mandatory=mandatory
            )
            self._sequence += 1
        except (amqp_exc.FrameSyntaxError, TypeError, ValueError, OverflowError) as exc:
            raise PublishError(
                f"the message for {describe_target} cannot be encoded as AMQP ({exc}); headers "
                "and properties may hold only str, bytes, int, float, bool, None, datetime, "
                "Decimal, lists and dicts"
            ) from exc
        if self.settings.confirm_publish:
            chan.wait([spec.Basic.Ack, spec.Basic.Nack])
        if self._returned is not None:
            code, text = self._returned
            raise Unroutable(
                f"RabbitMQ could not route the message for {describe_target} to any queue "
                f"({code} {text}); declare the queue first (broker.declare) or enable "
                "declare_on_publish"
            )
        if self._nacked:
            raise Nacked(
                f"RabbitMQ refused (nacked) the message for {describe_target} until "
                f"publish_retry_timeout ({self.settings.publish_retry_timeout:g}s) passed; it was "
                "not stored (a quorum queue without a leader, the server out of disk or memory, "
                "or the queue full with overflow=reject-publish). Check the server log and retry "
                "later."
            )

    def publish_batch(self, items: Sequence[Outgoing]) -> None:
        """Publish every item, then wait for all their confirms at once, retrying on a lost
        connection and on nacks; raises `PublishError` naming what the broker did not take.

        One confirm wait per batch instead of one per message: a group's or chord's tasks (and
        anything else sent together) cost about one round trip (and one fsync by RabbitMQ) instead
        of one each. Each attempt sends only the items not confirmed yet: after a reconnect the
        ones in flight, after a nack the refused ones (on a fresh channel, with backoff, until
        `publish_retry_timeout`, as a single publish is retried). An item counts as sent only
        once RabbitMQ acked it; the error raised in the end lists the task ids of all the others.
        """
        done: set[int] = set()

        def attempt(chan: amqp.Channel) -> None:
            self._returned, self._nacked = None, False
            self._awaiting, self._confirmed, self._refused = {}, set(), set()
            self._unroutable, self._returned_ids = [], []
            try:
                for index, item in enumerate(items):
                    if index in done:
                        continue
                    if item.before is not None:
                        item.before(chan)
                    try:
                        chan.basic_publish(
                            item.message,
                            exchange=item.exchange,
                            routing_key=item.routing_key,
                            mandatory=True,
                        )
                    except (amqp_exc.FrameSyntaxError, TypeError, ValueError, OverflowError) as exc:
                        raise PublishError(
                            f"the message for {item.describe()} cannot be encoded as AMQP "
                            f"({exc}); headers and properties may hold only str, bytes, int, "
                            "float, bool, None, datetime, Decimal, lists and dicts"
                        ) from exc
                    self._sequence += 1
                    if self.settings.confirm_publish:
                        self._awaiting[self._sequence] = index
                    else:
                        done.add(index)
                while self._awaiting:
                    chan.wait([spec.Basic.Ack, spec.Basic.Nack])
            finally:
                # a returned message is acked too, but it reached no queue: it is not sent
                done.update(self._confirmed - set(self._unroutable_items(items)))
                self._awaiting = {}
            if self._unroutable:
                raise Unroutable(
                    f"RabbitMQ could not route {len(self._unroutable)} of {len(items)} messages "
                    f"to any queue ({', '.join(sorted(set(self._unroutable))[:5])}); declare the "
                    "queues first (broker.declare) or enable declare_on_publish"
                )
            if self._refused:
                refused = sorted(self._refused)
                raise Nacked(
                    f"RabbitMQ refused (nacked) {len(refused)} of {len(items)} messages of a batch "
                    f"({_listing(items[i].describe() for i in refused)}) and kept refusing them "
                    f"until publish_retry_timeout ({self.settings.publish_retry_timeout:g}s) "
                    "passed; they were not stored (a quorum queue without a leader, the server "
                    "out of disk or memory, or a queue full with overflow=reject-publish). Check "
                    "the server log and send them again later."
                )

        def failed(error: type[PublishError], text: str) -> PublishError:
            """`error` with what was stored and what not; `not_sent` set when every unsent
            item has a task id (so the producer reports the others as sent)."""
            left = [items[i] for i in range(len(items)) if i not in done]
            names = [item.task_id or item.target for item in left]
            if names:
                text += f" (stored {len(items) - len(left)} of {len(items)}; not sent: "
                text += f"{_listing(names)})"
            out = error(text)
            if all(item.task_id for item in left):
                out.not_sent = frozenset(item.task_id or "" for item in left)
            return out

        try:
            self.call(f"publish {len(items)} messages", attempt)
        except AccessDenied as exc:
            raise failed(PublishAccessDenied, str(exc)) from exc.__cause__
        except PublishError as exc:
            raise failed(type(exc), str(exc)) from exc.__cause__
        except BrokerError as exc:
            raise failed(PublishError, str(exc)) from exc.__cause__
        except amqp_exc.AMQPError as exc:
            text = f"RabbitMQ rejected a message of a batch: {describe(exc)}"
            raise failed(PublishError, text) from exc

    def _unroutable_items(self, items: Sequence[Outgoing]) -> list[int]:
        """The batch items RabbitMQ returned, by their task id (the returned message's
        correlation_id) where they have one."""
        returned = set(self._returned_ids)
        return [i for i, item in enumerate(items) if item.task_id in returned]

    # -- py-amqp event handlers ------------------------------------------------------------------
    def _on_return(self, exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        self._returned = (getattr(exc, "code", 0), getattr(exc, "reply_text", "") or str(exc))
        self._unroutable.append(routing_key or exchange)
        ident = getattr(message, "properties", {}).get("correlation_id")
        if ident:
            self._returned_ids.append(str(ident))

    def _settled(self, delivery_tag: int, multiple: bool) -> list[int]:
        """The batch items a confirm (or a nack) settles."""
        tags = [t for t in self._awaiting if t <= delivery_tag] if multiple else [delivery_tag]
        return [self._awaiting.pop(t) for t in tags if t in self._awaiting]

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._confirmed.update(self._settled(delivery_tag, multiple))

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._nacked = True
        self._refused.update(self._settled(delivery_tag, multiple))
