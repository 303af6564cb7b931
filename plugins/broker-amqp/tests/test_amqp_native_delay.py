"""Celery's native delayed delivery on quorum queues, and batches the broker nacks.

Against the shared RabbitMQ: the `celery_delayed_*` topology is shared by design (a Celery worker
on the same server declares the same one) and stays; every work queue is unique and deleted.
The worker-level interop (millpond and Celery 5.7 workers as subprocesses) is in
tests/interop/test_quorum_delays.py.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import amqp
import pytest
from kombu import Connection, Exchange, Queue
from kombu.transport import native_delayed_delivery as kombu_delays

from millpond.contracts.broker import Outbound
from millpond.exceptions import PublishError
from millpond.testing.broker_kit import fetch_until
from millpond.wire.protocol import encode_task
from millpond_broker_amqp import AmqpBroker, native_delay

pytestmark = pytest.mark.amqp

URL = "amqp://guest:guest@127.0.0.1:5672//"
FAST = {"heartbeat": 2, "publish_retry_timeout": 5, "operation_timeout": 5}


class Admin:
    """The test's own connection, for checks and clean-up (not the code under test)."""

    def __init__(self) -> None:
        self.conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
        self.conn.connect()
        self.created: list[str] = []

    def queue(self) -> str:
        name = f"mp-native-{uuid.uuid4().hex[:12]}"
        self.created.append(name)
        return name

    def ready(self, queue: str) -> int:
        chan = self.conn.channel()
        try:
            return int(chan.queue_declare(queue, passive=True).message_count)
        finally:
            if chan.is_open:
                chan.close()

    def take(self, queue: str) -> list[str]:
        """Every ready message of `queue`, acked: their task ids."""
        chan = self.conn.channel()
        out: list[str] = []
        try:
            while (got := chan.basic_get(queue, no_ack=True)) is not None:
                out.append(str(got.properties["correlation_id"]))
        finally:
            chan.close()
        return out

    def close(self) -> None:
        chan = self.conn.channel()
        for name in self.created:
            for queue in (name, f"{name}.dead"):
                chan.queue_delete(queue)
            chan.exchange_delete(name)
        self.conn.close()


@pytest.fixture
def admin() -> Iterator[Admin]:
    helper = Admin()
    yield helper
    helper.close()


@pytest.fixture
def make_amqp() -> Iterator[Callable[..., AmqpBroker]]:
    made: list[AmqpBroker] = []

    def make(**options: Any) -> AmqpBroker:
        broker = AmqpBroker(URL, {**FAST, **options})
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.close()


# -- the routing key -------------------------------------------------------------------------------


def test_the_routing_key_is_kombus_and_never_early() -> None:
    for seconds in (1, 2, 5, 37, 3600, native_delay.MAX_DELAY):
        assert native_delay.routing_key(seconds, "q.x") == kombu_delays.calculate_routing_key(
            seconds, "q.x"
        )
    # rounded up, never down (Celery truncates; a millpond message is never released early)
    assert native_delay.routing_key(1.2, "q") == kombu_delays.calculate_routing_key(2, "q")
    assert native_delay.routing_key(0, "q") is None
    assert native_delay.routing_key(-3, "q") is None


def test_a_delay_longer_than_the_topology_holds_is_refused(
    make_amqp: Callable[..., AmqpBroker], admin: Admin
) -> None:
    broker = make_amqp(queue_type="quorum")
    queue = admin.queue()
    broker.declare([queue])
    too_far = time.time() + native_delay.MAX_DELAY + 3600
    with pytest.raises(PublishError, match=r"longer than .*native delayed delivery.*2\*\*28-1"):
        broker.publish(queue, encode_task("t", ()), eta=too_far)
    with pytest.raises(PublishError, match="longer than"):
        broker.publish_many([Outbound(queue, encode_task("t", ()), too_far)] * 2)
    assert admin.ready(queue) == 0


# -- the topology ----------------------------------------------------------------------------------


def test_millpond_and_kombu_declare_the_same_topology(make_amqp: Callable[..., AmqpBroker]) -> None:
    """Either may come first: each one's declaration agrees with the other's (a mismatch in any
    argument is a PRECONDITION_FAILED channel error)."""
    broker = make_amqp(queue_type="quorum")
    broker._link.call(
        "declare the native delay topology",
        lambda chan: native_delay.declare_topology(chan, "quorum"),
    )
    with Connection(URL) as conn:
        kombu_delays.declare_native_delayed_delivery_exchanges_and_queues(conn, "quorum")
    broker._link.call(
        "declare the native delay topology",
        lambda chan: native_delay.declare_topology(chan, "quorum"),
    )


def test_a_topic_queue_is_bound_as_celerys_worker_binds_it(
    make_amqp: Callable[..., AmqpBroker], admin: Admin
) -> None:
    queue = admin.queue()
    make_amqp(queue_type="quorum", exchange_type="topic").declare([queue])
    celery_queue = Queue(
        queue, Exchange(queue, type="topic"), queue, queue_arguments={"x-queue-type": "quorum"}
    )
    with Connection(URL) as conn:
        celery_queue(conn.default_channel).declare()  # no PRECONDITION_FAILED
        kombu_delays.bind_queue_to_native_delayed_delivery_exchange(conn, celery_queue)
    make_amqp(queue_type="quorum", exchange_type="topic").declare([queue])


# -- delays through it -----------------------------------------------------------------------------


@pytest.mark.parametrize("exchange_type", ["direct", "topic"])
def test_a_countdown_on_a_quorum_queue_is_held_by_rabbitmq(
    make_amqp: Callable[..., AmqpBroker], admin: Admin, exchange_type: str
) -> None:
    broker = make_amqp(queue_type="quorum", exchange_type=exchange_type)
    queue, other = admin.queue(), admin.queue()
    # a queue whose name ends like this one's must not get its delayed messages
    broker.declare([queue, f"x.{queue}"])
    admin.created.append(f"x.{queue}")
    sent = time.time()
    broker.publish(queue, encode_task("t", (), task_id="single"), eta=sent + 2)
    broker.publish_many(
        [
            Outbound(queue, encode_task("t", (), task_id="batched"), sent + 2),
            Outbound(other, encode_task("t", (), task_id="now")),
        ]
    )
    assert admin.ready(queue) == 0, "a delayed message went straight to its queue"
    assert admin.take(other) == ["now"]
    consumer = broker.consumer([queue], 4)
    try:
        got = fetch_until(consumer, 2, 30, max_count=4)
        arrived = time.time()
        assert sorted(d.message.task_id or "" for d in got) == ["batched", "single"]
        assert arrived >= sent + 2, f"released {sent + 2 - arrived:.2f} s early"
        assert not any(k.startswith(("x-death", "x-first")) for d in got for k in d.message.headers)
        consumer.ack(got)
    finally:
        consumer.close()
    assert admin.ready(f"x.{queue}") == 0


def test_a_celery_producers_countdown_reaches_a_millpond_consumer(
    make_amqp: Callable[..., AmqpBroker], admin: Admin
) -> None:
    """Celery publishes a countdown on a quorum queue with a topic exchange into
    `celery_delayed_27` (not into the queue); a millpond consumer gets it after the delay."""
    from celery import Celery

    queue = admin.queue()
    broker = make_amqp(queue_type="quorum", exchange_type="topic")
    broker.declare([queue])  # the worker's side: the queue and its binding for the last hop
    app = Celery("native", broker=URL)
    app.conf.task_queues = [
        Queue(
            queue, Exchange(queue, type="topic"), queue, queue_arguments={"x-queue-type": "quorum"}
        )
    ]
    try:
        sent = time.time()
        result = app.send_task("proj.add", args=(2, 3), queue=queue, countdown=2)
        assert admin.ready(queue) == 0, "Celery did not use its native delayed delivery"
        consumer = broker.consumer([queue], 1)
        try:
            (d,) = fetch_until(consumer, 1, 30)
            assert time.time() >= sent + 2 - 0.05
            assert d.message.task_id == result.id
            consumer.ack([d])
        finally:
            consumer.close()
    finally:
        app.close()


# -- batches the broker nacks ----------------------------------------------------------------------


def _full_queue(admin: Admin) -> str:
    """A queue that holds one message and nacks every publish past it."""
    queue = admin.queue()
    chan = admin.conn.channel()
    chan.queue_declare(
        queue,
        durable=True,
        auto_delete=False,
        arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
    )
    chan.close()
    return queue


def test_a_batch_the_broker_keeps_nacking_fails_naming_what_was_not_sent(
    make_amqp: Callable[..., AmqpBroker], admin: Admin
) -> None:
    queue = _full_queue(admin)
    broker = make_amqp(declare_on_publish=False, publish_retry_timeout=1)
    batch = [Outbound(queue, encode_task("t", (), task_id=f"task-{i}")) for i in range(3)]
    start = time.monotonic()
    with pytest.raises(PublishError, match="nacked") as caught:
        broker.publish_many(batch)
    assert time.monotonic() - start >= 1, "gave up before publish_retry_timeout"
    text = str(caught.value)
    assert "(stored 1 of 3; not sent: task-1, task-2)" in text, text
    assert "task-0" not in text.split("not sent:")[1]
    assert caught.value.not_sent == {"task-1", "task-2"}  # the producer reports task-0 sent
    # exactly the one it reported stored is there, once: nothing lost silently, nothing doubled
    assert admin.take(queue) == ["task-0"]
    broker.publish(queue, batch[1].message)  # the link survives; room again, it goes
    assert admin.take(queue) == ["task-1"]


def test_nacked_messages_of_a_batch_are_sent_again_until_stored(
    make_amqp: Callable[..., AmqpBroker], admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    queue = _full_queue(admin)
    broker = make_amqp(declare_on_publish=False, publish_retry_timeout=60)
    broker.publish(queue, encode_task("t", (), task_id="filler"))  # the queue is full now
    batch = [Outbound(queue, encode_task("t", (), task_id=f"task-{i}")) for i in range(4)]
    failed: list[BaseException] = []

    def send() -> None:
        try:
            broker.publish_many(batch)
        except BaseException as exc:
            failed.append(exc)

    caplog.set_level(logging.WARNING, logger="millpond.broker.amqp")
    sender = threading.Thread(target=send)
    sender.start()
    try:
        deadline = time.monotonic() + 30
        while "nacked" not in caplog.text:  # the first attempt was refused, and said so
            assert time.monotonic() < deadline, "the batch was never nacked"
            assert not failed, failed
            time.sleep(0.01)
        seen: list[str] = []
        while sender.is_alive() or admin.ready(queue):  # make room, one message at a time
            assert time.monotonic() < deadline + 30, f"only {seen} arrived"
            seen += admin.take(queue)
            time.sleep(0.01)
    finally:
        sender.join(90)
    assert not failed, failed
    assert sorted(seen) == ["filler", "task-0", "task-1", "task-2", "task-3"], seen


def test_a_millpond_countdown_reaches_a_queue_only_celery_declared_and_bound(
    make_amqp: Callable[..., AmqpBroker], admin: Admin
) -> None:
    """The producer declares nothing of the queue (declare_on_publish off): the message reaches
    it only through Celery's own binding for the last hop, so it went through Celery's levels."""
    queue = admin.queue()
    celery_queue = Queue(
        queue, Exchange(queue, type="topic"), queue, queue_arguments={"x-queue-type": "quorum"}
    )
    with Connection(URL) as conn:
        celery_queue(conn.default_channel).declare()
        kombu_delays.declare_native_delayed_delivery_exchanges_and_queues(conn, "quorum")
        kombu_delays.bind_queue_to_native_delayed_delivery_exchange(conn, celery_queue)
    broker = make_amqp(queue_type="quorum", exchange_type="topic", declare_on_publish=False)
    sent = time.time()
    broker.publish(queue, encode_task("t", (), task_id="held"), eta=sent + 1)
    assert admin.ready(queue) == 0
    deadline = time.monotonic() + 30
    while admin.ready(queue) < 1:
        assert time.monotonic() < deadline, "the delayed message never reached the queue"
        time.sleep(0.02)
    assert time.time() >= sent + 1
    assert admin.take(queue) == ["held"]
