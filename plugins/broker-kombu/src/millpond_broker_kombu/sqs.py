"""Amazon SQS through kombu's SQS transport: Celery's queues, names and bytes, millpond's guarantees.

Publishing goes through kombu's producer, so queue names (`queue_name_prefix`, kombu's character
translation), FIFO group and deduplication ids and the base64 body are exactly what Celery writes.
Consuming uses the boto3 client kombu configured (boto3 clients are thread-safe) from helper
threads, because a worker needs what kombu's consumer does not give:

* one long-polling receiver thread per queue, so an idle queue costs one request per
  `wait_time_seconds` and `fetch` still returns at once when the waker fires;
* a prefetch limit that counts messages received but not yet fetched;
* a visibility heartbeat: every message a consumer holds has its visibility timeout extended every
  third of `visibility_timeout`, so a long task is never received by a second worker, while a
  killed worker's messages come back after `visibility_timeout`;
* delivery counts from SQS's `ApproximateReceiveCount`.

Delays: SQS holds a message at most 15 minutes (`DelaySeconds` <= 900). A longer eta is sent with
the longest delay and the header `x-millpond-eta`; the millpond consumer that receives it early
sends it on for the rest (one hop per 15 minutes), so it never waits in a worker's memory. FIFO
queues take no per-message delay: such a publish raises `PublishError` saying so.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from millpond.contracts.broker import Broker, Consumer, Delivery, dead_letter_queue, mask_url
from millpond.contracts.waking import Waker
from millpond.exceptions import (
    AccessDenied,
    BrokerError,
    ConfigurationError,
    MalformedMessage,
    PublishAccessDenied,
    PublishError,
)
from millpond.wire import envelope
from millpond.wire.protocol import DEATH_REASON, Message
from millpond_broker_kombu.link import Link, access_denied, denied, warn_unused_priority
from millpond_broker_kombu.section import SQS, SQS_MAX_DELAY

log = logging.getLogger("millpond.broker.sqs")

T = TypeVar("T")

#: header of a message whose eta lies past SQS's 15-minute limit: when it is really due
LONG_ETA = "x-millpond-eta"
#: the system attributes read with each message (the delivery count; a FIFO message's group)
_ATTRIBUTES = ["ApproximateReceiveCount", "SentTimestamp", "MessageGroupId"]
_BATCH = 10  # SQS's limit for ReceiveMessage, DeleteMessageBatch, ChangeMessageVisibilityBatch


def _is_fifo(physical: str) -> bool:
    return physical.endswith(".fifo")


def decode_body(raw: str) -> Message:
    """kombu's envelope from an SQS message body (base64, as kombu writes it by default, or the
    plain JSON of `sqs_base64_encoding=False`)."""
    text = raw.strip()
    if not text.startswith("{"):
        try:
            text = base64.b64decode(text, validate=True).decode("utf-8")
        except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
            raise MalformedMessage(f"SQS message body is neither JSON nor base64 JSON: {exc}")
    return envelope.loads(text)


def _batch(method: str, url: str, entries: list[dict[str, Any]]) -> Callable[[Any], Any]:
    """A call of one of boto3's batch methods, for `SqsBroker.call`."""
    return lambda client: getattr(client, method)(QueueUrl=url, Entries=entries)


@dataclass(eq=False, slots=True)
class Held:
    """A received SQS message: the delivery tag the worker hands back."""

    queue: str
    url: str
    receipt: str
    count: int
    raw: dict[str, Any] = field(repr=False)
    #: (monotonic) until when SQS keeps it hidden from other consumers, as far as this one knows
    hidden_until: float = 0.0


class SqsBroker(Broker):
    """`sqs://[key:secret@][host[:port]]` (kombu's URL: no host means AWS's own endpoint)."""

    system: ClassVar[str] = "aws_sqs"
    supports_delay: ClassVar[bool] = True
    #: the longest delay SQS holds a message (its DelaySeconds limit); longer ones hop
    max_delay: ClassVar[int] = SQS_MAX_DELAY

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self.safe_url = mask_url(url)
        # kombu reads its own settings from transport_options; the query holds millpond's
        base = url.split("?", 1)[0]
        self.settings = SQS.resolve(self.options, url=url, masked=self.safe_url)
        s = self.settings
        self.visibility = float(s["visibility_timeout"])
        self.wait = int(s["wait_time_seconds"])
        self.retry_timeout = float(s["publish_retry_timeout"])
        transport_options: dict[str, Any] = {
            "region": s["region"],
            "is_secure": s["is_secure"],
            "queue_name_prefix": s["queue_name_prefix"],
            "wait_time_seconds": self.wait,
            "visibility_timeout": s["queue_visibility_timeout"],
            "sqs-creation-attributes": dict(s["creation_attributes"]),
        }
        self.link = Link(
            base,
            safe_url=self.safe_url,
            transport_options=transport_options,
            retry_timeout=self.retry_timeout,
        )
        self._lock = threading.Lock()
        self._names: dict[str, str] = {}
        self._urls: dict[str, str] = {}
        self._client: tuple[int, Any] | None = None
        self._declared: set[str] = set()

    def __repr__(self) -> str:
        return f"<SqsBroker {self.safe_url}>"

    # -- plumbing --------------------------------------------------------------------------------
    def client(self) -> Any:
        """The boto3 SQS client kombu configured from the URL (thread-safe; one per process)."""
        cached = self._client
        if cached is not None and cached[0] == os.getpid():
            return cached[1]
        made = self.link.run("connecting", lambda conn, _p: conn.default_channel.sqs())
        with self._lock:
            self._client = (os.getpid(), made)
        return made

    def physical(self, queue: str) -> str:
        """The SQS queue name kombu (and so Celery) uses for `queue`."""
        name = self._names.get(queue)
        if name is None:
            name = self.link.run(
                "naming a queue", lambda conn, _p: conn.default_channel.canonical_queue_name(queue)
            )
            self._names[queue] = name
        return name

    def call(self, what: str, op: Callable[[Any], T], error: type[BrokerError] = BrokerError) -> T:
        """One boto3 call with bounded retries while the endpoint is away."""
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + self.retry_timeout
        pause, attempts = 0.05, 0
        while True:
            attempts += 1
            try:
                return op(self.client())
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if denied(exc):
                    raise access_denied(
                        what, self.safe_url, exc, code, issubclass(error, PublishError)
                    ) from exc
                if "Throttl" not in code and code not in ("ServiceUnavailable", "InternalError"):
                    raise error(
                        f"{what} failed: SQS at {self.safe_url} said {code}: {exc}"
                    ) from exc
                failure: Exception = exc
            except BotoCoreError as exc:
                failure = exc
            left = deadline - time.monotonic()
            if left <= 0:
                raise error(
                    f"{what} failed: SQS at {self.safe_url} did not answer for "
                    f"{self.retry_timeout:g}s ({attempts} attempts; last error "
                    f"{type(failure).__name__}: {failure}); publish_retry_timeout sets how long "
                    "to keep trying"
                ) from failure
            if attempts == 1:
                log.warning("sqs: %s failed (%s); retrying for up to %.0fs", what, failure, left)
            time.sleep(min(pause, left))
            pause = min(pause * 2, 2.0)

    def url_of(self, queue: str, *, create: bool = True) -> str | None:
        """The queue's URL (created the way kombu creates it when missing and `create`)."""
        found = self._urls.get(queue)
        if found is not None:
            return found
        from botocore.exceptions import ClientError

        name = self.physical(queue)

        def look(client: Any) -> str | None:
            try:
                return str(client.get_queue_url(QueueName=name)["QueueUrl"])
            except ClientError as exc:
                if "NonExistentQueue" in str(exc) or "QueueDoesNotExist" in str(exc):
                    return None
                raise

        url = self.call(f"finding queue {name!r}", look)
        if url is None and create:
            self.link.run(
                f"creating queue {name!r}",
                lambda conn, _p: conn.default_channel.queue_declare(queue=queue),
            )
            url = self.call(f"finding queue {name!r}", look)
        if url is not None:
            self._urls[queue] = url
        return url

    def connect(self) -> None:
        self.call("listing queues", lambda c: c.list_queues(MaxResults=1))

    def close(self) -> None:
        self.link.close()
        self._client = None

    # -- topology --------------------------------------------------------------------------------
    def declare(self, queues: Iterable[str]) -> None:
        for queue in queues:
            if queue in self._declared:
                continue
            url = self.url_of(queue)
            dead = self.url_of(dead_letter_queue(queue))
            after = self.settings["dead_letter_after"]
            if after is not None and url is not None and dead is not None:
                self._set_redrive(queue, url, dead, int(after))
            self._declared.add(queue)

    def _set_redrive(self, queue: str, url: str, dead: str, after: int) -> None:
        if _is_fifo(self.physical(queue)):
            raise ConfigurationError(
                f"dead_letter_after on FIFO queue {queue!r}: SQS wants a FIFO queue's redrive "
                f"target to be FIFO too, and {dead_letter_queue(queue)!r} is not; unset "
                "dead_letter_after (millpond still dead-letters after max_deliveries)"
            )
        import json

        arn = self.call(
            "reading a queue ARN",
            lambda c: c.get_queue_attributes(QueueUrl=dead, AttributeNames=["QueueArn"]),
        )["Attributes"]["QueueArn"]
        policy = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": str(after)})
        self.call(
            "setting a redrive policy",
            lambda c: c.set_queue_attributes(QueueUrl=url, Attributes={"RedrivePolicy": policy}),
        )

    # -- producing -------------------------------------------------------------------------------
    def publish(self, queue: str, message: Message, *, eta: float | None = None) -> None:
        warn_unused_priority("SQS", message)
        props: dict[str, Any] = {}
        try:
            fifo = _is_fifo(self.physical(queue))
        except AccessDenied as exc:  # a publish says so as a publish error
            raise PublishAccessDenied(str(exc)) from exc
        except PublishError:
            raise
        except BrokerError as exc:
            raise PublishError(str(exc)) from exc
        if fifo:
            props["MessageGroupId"] = message.properties.get(
                "MessageGroupId", self.settings["message_group_id"]
            )
        headers = message.headers
        delay = 0.0 if eta is None else eta - time.time()
        if LONG_ETA in headers and delay <= self.max_delay:
            headers = {k: v for k, v in headers.items() if k != LONG_ETA}
        if delay > 0:
            if fifo:
                raise PublishError(
                    f"queue {queue!r} is an SQS FIFO queue, which cannot delay one message "
                    f"(asked for {delay:.0f}s); send it without countdown/eta, or use a standard "
                    "queue for delayed tasks"
                )
            if delay > self.max_delay:
                headers = {**headers, LONG_ETA: eta}
            props["DelaySeconds"] = min(self.max_delay, math.ceil(delay))
        if headers is not message.headers:
            message = Message(
                body=message.body,
                headers=headers,
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                properties=message.properties,
            )
        self.link.publish(queue, message, **props)

    # -- consuming -------------------------------------------------------------------------------
    def consumer(self, queues: Sequence[str], prefetch: int) -> Consumer:
        return SqsConsumer(self, list(queues), prefetch)

    # -- administration --------------------------------------------------------------------------
    def _receive(self, url: str, count: int, visibility: int) -> list[dict[str, Any]]:
        resp = self.call(
            "receiving",
            lambda c: c.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=max(1, min(_BATCH, count)),
                WaitTimeSeconds=0,
                VisibilityTimeout=visibility,
                MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
            ),
        )
        return list(resp.get("Messages", []))

    def delete(self, url: str, receipts: Sequence[str]) -> None:
        """Delete messages by receipt handle, ten per request."""
        for start in range(0, len(receipts), _BATCH):
            chunk = receipts[start : start + _BATCH]
            entries = [{"Id": str(i), "ReceiptHandle": r} for i, r in enumerate(chunk)]
            resp = self.call("deleting messages", _batch("delete_message_batch", url, entries))
            for failed in resp.get("Failed", []):
                log.warning("sqs: deleting a message failed: %s", failed.get("Message"))

    def set_visibility(self, url: str, receipts: Sequence[str], seconds: int) -> None:
        """Change the visibility timeout of messages by receipt handle, ten per request."""
        for start in range(0, len(receipts), _BATCH):
            chunk = receipts[start : start + _BATCH]
            entries = [
                {"Id": str(i), "ReceiptHandle": r, "VisibilityTimeout": seconds}
                for i, r in enumerate(chunk)
            ]
            resp = self.call(
                "changing visibility", _batch("change_message_visibility_batch", url, entries)
            )
            for failed in resp.get("Failed", []):
                # extending (the heartbeat) matters: past SQS's 12-hour cap the message will be
                # delivered again; giving back a message already gone does not
                level = logging.WARNING if seconds > 0 else logging.DEBUG
                log.log(level, "sqs: changing visibility failed: %s", failed.get("Message"))

    def _approximate(self, url: str, attribute: str = "ApproximateNumberOfMessages") -> int:
        resp = self.call(
            "counting a queue",
            lambda c: c.get_queue_attributes(QueueUrl=url, AttributeNames=[attribute]),
        )
        return int(resp["Attributes"][attribute])

    def purge(self, queue: str) -> int:
        """Receive and delete every ready message (SQS's PurgeQueue takes in-flight messages too,
        allows one call a minute and does not say how many it removed)."""
        url = self.url_of(queue, create=False)
        if url is None:
            return 0
        count, empty_rounds = 0, 0
        while empty_rounds < 3:
            got = self._receive(url, _BATCH, 30)
            if got:
                empty_rounds = 0
                self.delete(url, [m["ReceiptHandle"] for m in got])
                count += len(got)
            elif self._approximate(url) == 0:
                break
            else:
                empty_rounds += 1
        return count

    def queue_length(self, queue: str) -> int:
        url = self.url_of(queue, create=False)
        return 0 if url is None else self._approximate(url)

    def _take_dead(self, queue: str, limit: int | None, hold: int) -> tuple[str, list[Any]]:
        url = self.url_of(dead_letter_queue(queue), create=False)
        taken: list[dict[str, Any]] = []
        if url is None:
            return "", taken
        while limit is None or len(taken) < limit:
            want = _BATCH if limit is None else min(_BATCH, limit - len(taken))
            got = self._receive(url, want, hold)
            if not got:
                break
            taken.extend(got)
        taken.sort(key=lambda m: int(m.get("Attributes", {}).get("SentTimestamp", 0)))
        return url, taken

    def dead_letters(self, queue: str, limit: int = 100) -> list[Message]:
        """Dead letters, oldest first (received, read, and made visible again at once)."""
        url, taken = self._take_dead(queue, limit, 30)
        out: list[Message] = []
        for raw in taken:
            try:
                out.append(decode_body(raw["Body"]))
            except MalformedMessage as exc:
                log.warning("sqs: an undecodable dead letter in %s: %s", queue, exc)
        if taken:
            self.set_visibility(url, [m["ReceiptHandle"] for m in taken], 0)
        return out

    def replay_dead_letters(self, queue: str, limit: int | None = None) -> int:
        url, taken = self._take_dead(queue, limit, 60)
        moved = 0
        for raw in taken:
            try:
                msg = decode_body(raw["Body"])
            except MalformedMessage:
                self.set_visibility(url, [raw["ReceiptHandle"]], 0)
                continue
            msg.headers.pop(DEATH_REASON, None)
            self.publish(queue, msg)
            self.delete(url, [raw["ReceiptHandle"]])
            moved += 1
        return moved


class SqsConsumer(Consumer):
    """Receives from SQS queues for one worker; see the module docstring for the threads."""

    def __init__(self, broker: SqsBroker, queues: list[str], prefetch: int) -> None:
        self.broker = broker
        self.queues = queues
        self.prefetch = max(1, prefetch)
        self.urls = {q: u for q in queues if (u := broker.url_of(q)) is not None}
        self._cond = threading.Condition()
        self._buffer: deque[Held] = deque()
        self._held: set[Held] = set()
        #: received or being received (slots reserved by a receiver thread) and not yet settled
        self._outstanding = 0
        self._closed = threading.Event()
        #: set by `release`: the receivers stop, so the slots given back are not filled again
        self._released = False
        self._ready = Waker()
        self._connected = True
        self._denied: BrokerError | None = None
        self._share = max(1, math.ceil(self.prefetch / max(1, len(queues))))
        fifo = [q for q in queues if _is_fifo(broker.physical(q))]
        if fifo and self.prefetch > 1:
            log.warning(
                "sqs: FIFO queue(s) %s with a prefetch window of %d: messages of one group may "
                "run at the same time, out of order; use prefetch 1 (-c 1 "
                "--prefetch-multiplier 1) where the order matters",
                ", ".join(fifo),
                self.prefetch,
            )
        self._threads = [
            threading.Thread(
                target=self._receive_loop, args=(q,), name=f"millpond-sqs-recv-{q}", daemon=True
            )
            for q in queues
        ]
        self._threads.append(
            threading.Thread(target=self._heartbeat_loop, name="millpond-sqs-beat", daemon=True)
        )
        for thread in self._threads:
            thread.start()

    @property
    def connected(self) -> bool:
        return self._connected and not self._closed.is_set()

    # -- the helper threads ------------------------------------------------------------------------
    def _receive_loop(self, queue: str) -> None:
        url = self.urls[queue]
        pause = 0.1
        visibility = math.ceil(self.broker.visibility)
        while not self._closed.is_set():
            with self._cond:
                while not self._closed.is_set() and (
                    self._released or self._outstanding >= self.prefetch
                ):
                    self._cond.wait(1.0)
                if self._closed.is_set():
                    return
                want = min(_BATCH, self.prefetch - self._outstanding, self._share)
                self._outstanding += want
            sent = time.monotonic()  # the visibility counts from (at the latest) now
            try:
                resp = self.broker.client().receive_message(
                    QueueUrl=url,
                    MaxNumberOfMessages=want,
                    WaitTimeSeconds=self.broker.wait,
                    VisibilityTimeout=visibility,
                    MessageSystemAttributeNames=_ATTRIBUTES,
                )
            except Exception as exc:  # botocore's errors, and anything else: never die quietly
                with self._cond:
                    self._outstanding -= want
                code = denied(exc)
                if code is not None:  # no retry cures it: fetch raises it, the worker stops
                    self._denied = access_denied(
                        f"receiving from {queue!r}", self.broker.safe_url, exc, code, False
                    )
                    self._ready.wake()
                    return
                if self._connected:
                    log.warning("sqs: receiving from %s failed (%s); retrying", queue, exc)
                self._connected = False
                self._closed.wait(pause)
                pause = min(pause * 2, 5.0)
                continue
            pause = 0.1
            self._connected = True
            got = [
                Held(
                    queue=queue,
                    url=url,
                    receipt=m["ReceiptHandle"],
                    count=int(m.get("Attributes", {}).get("ApproximateReceiveCount", 1)),
                    raw=m,
                    hidden_until=sent + visibility,
                )
                for m in resp.get("Messages", [])
            ]
            with self._cond:
                self._outstanding -= want - len(got)
                if not self._closed.is_set() and not self._released:
                    self._buffer.extend(got)
                    got = []
                else:
                    self._outstanding -= len(got)
            if got:  # closed or released while receiving: give them straight back
                self._give_back(got)
            else:
                self._ready.wake()

    def _heartbeat_loop(self) -> None:
        """Extend the visibility of every message this consumer holds, every third of it."""
        period = max(0.2, self.broker.visibility / 3)
        extend = math.ceil(self.broker.visibility)
        while not self._closed.wait(period):
            with self._cond:
                held = [*self._held, *self._buffer]
            by_url: dict[str, list[str]] = {}
            for h in held:
                by_url.setdefault(h.url, []).append(h.receipt)
            for url, receipts in by_url.items():
                began = time.monotonic()
                try:
                    self.broker.set_visibility(url, receipts, extend)
                except Exception as exc:  # the heartbeat must outlive any one failure
                    log.warning("sqs: extending visibility failed (%s)", exc)
                    continue
                for h in held:
                    if h.url == url:
                        h.hidden_until = began + extend

    # -- the consumer contract ---------------------------------------------------------------------
    def fetch(self, max_count: int, timeout: float, waker: Waker | None = None) -> list[Delivery]:
        import select

        deadline = time.monotonic() + timeout
        while True:
            out = self._take(max_count)
            if out:
                return out
            if self._denied is not None:
                raise self._denied
            left = deadline - time.monotonic()
            if left <= 0 or self._closed.is_set():
                return []
            if waker is not None and waker.is_set:
                return []
            fds: list[Any] = [self._ready] if waker is None else [self._ready, waker]
            try:
                ready, _, _ = select.select(fds, [], [], left)
            except (OSError, ValueError):
                return []
            if waker is not None and waker in ready:
                self._ready.clear()
                return self._take(max_count)
            self._ready.clear()

    def _take(self, max_count: int) -> list[Delivery]:
        out: list[Delivery] = []
        while len(out) < max_count:
            with self._cond:
                if not self._buffer:
                    break
                held = self._buffer.popleft()
                self._held.add(held)
            delivery = self._deliver(held)
            if delivery is not None:
                out.append(delivery)
        return out

    def _deliver(self, held: Held) -> Delivery | None:
        try:
            message = decode_body(held.raw.get("Body", ""))
        except MalformedMessage as exc:
            log.warning("sqs: dead-lettering an undecodable message from %s: %s", held.queue, exc)
            raw = str(held.raw.get("Body", "")).encode("utf-8", "replace")
            bad = Message(body=raw, headers={}, content_type="application/octet-stream")
            self._dead(held, bad, f"undecodable SQS message: {exc}")
            return None
        eta = message.headers.get(LONG_ETA)
        if isinstance(eta, int | float) and eta > time.time():
            # not due yet: send it on for the rest of its delay, never into a worker's memory
            self._settle([held])
            try:
                self.broker.publish(held.queue, message, eta=float(eta))
                self.broker.delete(held.url, [held.receipt])
            except BrokerError as exc:
                # no longer extended: SQS shows it again after the visibility timeout
                log.warning("sqs: could not send a long-delayed message on (%s); it comes "
                            "back after the visibility timeout", exc)  # fmt: skip
            return None
        return Delivery(
            message=message,
            queue=held.queue,
            tag=held,
            redelivered=held.count > 1,
            delivery_count=held.count,
        )

    def stale(self, delivery: Delivery) -> bool:
        """Whether SQS may already show this message to others: the last visibility this consumer
        set (at receive or by the heartbeat) has run out, e.g. after a SIGSTOP or an outage."""
        held = delivery.tag
        return isinstance(held, Held) and time.monotonic() > held.hidden_until

    def _settle(self, helds: Iterable[Held]) -> None:
        with self._cond:
            for h in helds:
                if h in self._held:
                    self._held.discard(h)
                    self._outstanding -= 1
            self._cond.notify_all()

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        by_url: dict[str, list[str]] = {}
        helds = [d.tag for d in deliveries if isinstance(d.tag, Held)]
        for h in helds:
            by_url.setdefault(h.url, []).append(h.receipt)
        try:
            for url, receipts in by_url.items():
                self.broker.delete(url, receipts)
        finally:
            self._settle(helds)

    def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        held = delivery.tag
        assert isinstance(held, Held)
        if requeue:
            try:
                self.broker.set_visibility(held.url, [held.receipt], 0)
            finally:
                self._settle([held])
            return
        self._dead(held, delivery.message, reason)

    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Stop the receivers first (each slot given back would otherwise be filled again, with
        the visibility heartbeat keeping the refill here), then make the worker's deliveries
        and whatever the receivers buffered visible again at once."""
        with self._cond:
            self._released = True
            buffered = list(self._buffer)
            self._buffer.clear()
            self._outstanding -= len(buffered)
            self._cond.notify_all()
        self._give_back(buffered)
        super().release(deliveries)

    def _dead(self, held: Held, message: Message, reason: str) -> None:
        headers = {**message.headers, DEATH_REASON: reason}
        copy = Message(
            body=message.body,
            headers=headers,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            properties=message.properties,
        )
        try:
            self.broker.publish(dead_letter_queue(held.queue), copy)
            self.broker.delete(held.url, [held.receipt])
        finally:
            self._settle([held])

    def _give_back(self, helds: Sequence[Held]) -> None:
        by_url: dict[str, list[str]] = {}
        for h in helds:
            by_url.setdefault(h.url, []).append(h.receipt)
        for url, receipts in by_url.items():
            try:
                self.broker.set_visibility(url, receipts, 0)
            except BrokerError as exc:
                log.warning(
                    "sqs: could not give %d message(s) back (%s); they return after the "
                    "visibility timeout",
                    len(receipts),
                    exc,
                )

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with self._cond:
            back = [*self._held, *self._buffer]
            self._held.clear()
            self._buffer.clear()
            self._outstanding = 0
            self._cond.notify_all()
        self._give_back(back)
        self._ready.close()
