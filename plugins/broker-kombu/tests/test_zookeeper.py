"""Zookeeper on a private Zookeeper server (Debian's package): the conformance kit, including a
SIGKILLed consumer's message coming back (the in-flight layer) and the broker-held delays; the
in-flight znodes and their restoring; due delayed messages moved once however many consumers
race; and the refusal to consume without allow_message_loss on the transports that still have no
in-flight layer."""

from __future__ import annotations

import math
import posixpath
import time
import uuid
from typing import Any

import pytest

from millpond.exceptions import ConfigurationError, PublishError
from millpond.testing.broker_kit import BrokerContract, sample_message
from millpond.wire.protocol import encode_task
from millpond_broker_kombu.generic import KombuBroker
from millpond_broker_kombu.link import release
from millpond_broker_kombu.testing import ZookeeperServer
from millpond_broker_kombu.zookeeper import ZookeeperBroker, ZookeeperConsumer

#: kazoo's session timeout (10 s, the test server's maxSessionTimeout) plus a recover_interval
SESSION = 10.0


class TestZookeeperContract(BrokerContract):
    redelivery_slack = 15.0  # a loaded machine: the server's session check, then a beat

    @pytest.fixture
    def broker_url(self, zookeeper: ZookeeperServer) -> str:
        return f"zookeeper://127.0.0.1:{zookeeper.port}/kit-{uuid.uuid4().hex[:8]}"

    @pytest.fixture
    def broker_options(self) -> dict[str, Any]:
        return {"polling_interval": 0.02, "recover_interval": 0.2}

    @pytest.fixture
    def lease_seconds(self) -> float:
        return SESSION


def _vhost_url(zookeeper: ZookeeperServer) -> str:
    return f"zookeeper://127.0.0.1:{zookeeper.port}/lease-{uuid.uuid4().hex[:8]}"


def _exists(broker: ZookeeperBroker, path: str) -> bool:
    """Whether a znode exists, asked on the broker's own connection (a closed consumer's client
    is stopped)."""
    return bool(
        broker.link.run("looking", lambda conn, _p: conn.default_channel.client.exists(path))
    )


# -- the in-flight layer -----------------------------------------------------------------------------


def test_zookeeper_consumes_without_allow_message_loss(zookeeper: ZookeeperServer) -> None:
    broker = ZookeeperBroker(_vhost_url(zookeeper))
    try:
        assert broker.redelivers_lost_deliveries is True
        consumer = broker.consumer(["q"], 1)
        assert isinstance(consumer, ZookeeperConsumer)
        consumer.close()
    finally:
        broker.close()


def test_a_claimed_message_waits_in_flight_and_an_ack_deletes_it(
    zookeeper: ZookeeperServer,
) -> None:
    broker = ZookeeperBroker(_vhost_url(zookeeper), {"polling_interval": 0.02})
    try:
        broker.declare(["q"])
        broker.publish("q", encode_task("kit.add", (1, 2), task_id="held"))
        consumer = broker.consumer(["q"], 4)
        assert isinstance(consumer, ZookeeperConsumer)
        try:
            got = consumer.fetch(4, 5.0)
            assert [d.message.task_id for d in got] == ["held"]
            assert broker.queue_length("q") == 0
            mine = posixpath.join(consumer.dir, "q")
            assert consumer.client.get_children(mine) == [posixpath.basename(str(got[0].tag))]
            consumer.ack(got)
            assert consumer.client.get_children(mine) == []
        finally:
            consumer.close()
        assert not _exists(broker, consumer.dir), "the in-flight directory stayed"
        assert not _exists(broker, posixpath.join(consumer.owners, consumer.id))
    finally:
        broker.close()


def test_requeue_and_close_move_messages_back_counted(zookeeper: ZookeeperServer) -> None:
    broker = ZookeeperBroker(_vhost_url(zookeeper), {"polling_interval": 0.02})
    try:
        broker.declare(["q"])
        broker.publish("q", encode_task("kit.add", (1, 2), task_id="again"))
        consumer = broker.consumer(["q"], 1)
        got = consumer.fetch(1, 5.0)
        consumer.reject(got[0], requeue=True)
        again = consumer.fetch(1, 5.0)
        assert [d.delivery_count for d in again] == [2]
        consumer.close()  # still held: goes back at a clean close
        other = broker.consumer(["q"], 1)
        try:
            third = other.fetch(1, 5.0)
            assert [(d.message.task_id, d.delivery_count) for d in third] == [("again", 3)]
            other.reject(third[0], requeue=False, reason="enough")
            dead = broker.dead_letters("q")
            assert [m.headers.get("x-millpond-death-reason") for m in dead] == ["enough"]
        finally:
            other.close()
    finally:
        broker.close()


def test_a_dead_owners_messages_are_restored_once(zookeeper: ZookeeperServer) -> None:
    """A consumer whose owner znode is gone (its session ended) is dead: the next beat of any
    live consumer puts what it had in flight back, counted, in kombu's envelope."""
    from kombu import Connection

    url = _vhost_url(zookeeper)
    broker = ZookeeperBroker(url, {"polling_interval": 0.02, "recover_interval": 60})
    try:
        broker.declare(["q"])
        for i in range(3):
            broker.publish("q", encode_task("kit.add", (i, i), task_id=f"orphan-{i}"))
        dying = broker.consumer(["q"], 3)
        assert isinstance(dying, ZookeeperConsumer)
        assert len(dying.fetch(3, 5.0)) == 3
        dying.keeper.stop()
        # what a session's end does: Zookeeper deletes the ephemeral owner znode
        dying.client.delete(posixpath.join(dying.owners, dying.id))
        rescuer = broker.consumer(["q"], 3)
        assert isinstance(rescuer, ZookeeperConsumer)
        try:
            # the rescuer's first beat restored them; a second restores nothing more
            assert broker.queue_length("q") == 3
            assert dying.client.exists(dying.dir) is None
            rescuer.keeper.beat_once()
            assert broker.queue_length("q") == 3
            # kombu's own consumer (what a Celery worker is) reads the restored messages
            conn = Connection(url)
            try:
                simple = conn.SimpleQueue("q", no_ack=True)
                seen = sorted(simple.get(timeout=5).headers["id"] for _ in range(3))
                assert seen == ["orphan-0", "orphan-1", "orphan-2"]
            finally:
                release(conn)
        finally:
            rescuer.close()
            dying._closed = True
            release(dying.conn)
    finally:
        broker.close()


# -- the transports without the layer -----------------------------------------------------------------


def test_consuming_without_allow_message_loss_is_refused(zookeeper: ZookeeperServer) -> None:
    """KombuBroker is what mongodb://, consul://, ... get; tried here on the one server at hand."""
    broker = KombuBroker(zookeeper.url)
    try:
        assert broker.redelivers_lost_deliveries is False
        with pytest.raises(ConfigurationError, match="allow_message_loss"):
            broker.consumer(["q"], 1)
    finally:
        broker.close()


def test_the_generic_kombu_broker_refuses_a_delay_with_the_reason(
    zookeeper: ZookeeperServer,
) -> None:
    broker = KombuBroker(zookeeper.url)
    try:
        assert broker.supports_delay is False
        with pytest.raises(PublishError, match="no broker-held delays"):
            broker.publish("q", sample_message(), eta=time.time() + 10)
    finally:
        broker.close()


# -- delays -------------------------------------------------------------------------------------------


def test_a_delayed_message_waits_in_zookeeper_named_by_due_time(
    zookeeper: ZookeeperServer,
) -> None:
    """The delayed znode sorts by due time and keeps kombu's priority; the stats count it; once
    due it lands in the queue under kombu's name, for kombu's own consumer too."""
    from kombu import Connection

    url = _vhost_url(zookeeper)
    broker = ZookeeperBroker(url, {"polling_interval": 0.02, "recover_interval": 60})
    try:
        broker.declare(["q"])
        eta = time.time() + 0.5
        urgent = encode_task("kit.add", (1, 2), task_id="urgent")
        urgent.properties["priority"] = 7
        broker.publish("q", urgent, eta=eta)
        broker.publish("q", encode_task("kit.add", (1, 2), task_id="later"), eta=eta + 60)
        stats = broker.queue_stats("q")
        assert (stats.ready, stats.delayed) == (0, 2)
        consumer = broker.consumer(["q"], 1)
        assert isinstance(consumer, ZookeeperConsumer)
        try:
            names = sorted(consumer.client.get_children(posixpath.join(consumer.delayed, "q")))
            assert names[0].startswith(f"{math.ceil(eta * 1000):016d}-002-"), names
            assert consumer.promote_due() == 0, "moved before its due time"
            deadline = time.monotonic() + 10
            while consumer.promote_due() == 0:
                assert time.monotonic() < deadline, "not moved within 10 s of its due time"
                time.sleep(0.02)
            queued = consumer.client.get_children(consumer.channel._get_path("q"))
            assert [n.rsplit("-", 1)[0] for n in queued] == ["entry-002"]
            assert broker.queue_stats("q").delayed == 1
        finally:
            consumer.close()
        conn = Connection(url)
        try:
            got = conn.SimpleQueue("q", no_ack=True).get(timeout=5)
            assert got.headers["id"] == "urgent"
        finally:
            release(conn)
    finally:
        broker.close()


def test_racing_consumers_move_a_due_message_once(zookeeper: ZookeeperServer) -> None:
    """Several consumers, each in its own thread with its own session, promote the same due
    messages at once: each message lands in the queue exactly once."""
    import threading

    broker = ZookeeperBroker(_vhost_url(zookeeper), {"recover_interval": 60})
    try:
        broker.declare(["q"])
        ids = [f"due-{i}" for i in range(30)]
        for task_id in ids:
            broker.publish("q", encode_task("kit.add", (1, 2), task_id=task_id),
                           eta=time.time() + 0.3)  # fmt: skip
        racers: list[Any] = [broker.consumer(["q"], 1) for _ in range(4)]
        delayed = posixpath.join(racers[0].delayed, "q")
        moved: list[int] = []
        start = threading.Barrier(len(racers))

        def race(consumer: Any) -> None:
            start.wait(30)
            deadline = time.monotonic() + 30
            count = 0
            # each spins until the messages fall due, then all move them at once
            while time.monotonic() < deadline and consumer.client.get_children(delayed):
                count += consumer.promote_due()
            moved.append(count)

        try:
            threads = [threading.Thread(target=race, args=(c,)) for c in racers]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            print(f"moved by each racer: {moved}")
            assert sum(moved) == len(ids), moved
            assert broker.queue_stats("q").delayed == 0
            assert broker.queue_length("q") == len(ids)
            got = [m.task_id for m in broker._take("q", None)]
            assert sorted(got) == sorted(ids)
        finally:
            for consumer in racers:
                consumer.close()
    finally:
        broker.close()


def test_kombus_own_consumer_reads_what_millpond_wrote(zookeeper: ZookeeperServer) -> None:
    from kombu import Connection

    url = f"zookeeper://127.0.0.1:{zookeeper.port}/interop-{uuid.uuid4().hex[:8]}"
    broker = ZookeeperBroker(url)
    try:
        broker.declare(["shared"])
        sent = encode_task("kit.add", (2, 3), task_id="zk-1")
        broker.publish("shared", sent)
        conn = Connection(url)
        try:
            got = conn.SimpleQueue("shared", no_ack=True).get(timeout=5)
            assert got.headers["id"] == "zk-1"
            assert got.body == sent.body
        finally:
            release(conn)  # kombu's own release leaves the KazooClient running
    finally:
        broker.close()


def test_a_celery_producer_feeds_a_millpond_consumer(zookeeper: ZookeeperServer) -> None:
    """Celery's own send_task writes kombu's envelope into the queue znode; the in-flight layer
    claims it as it is and the task decodes, protocol v2 intact."""
    from celery import Celery

    from millpond.wire.protocol import decode_task

    url = _vhost_url(zookeeper)
    broker = ZookeeperBroker(url, {"polling_interval": 0.02})
    celery = Celery("zk-producer", broker=url)
    try:
        broker.declare(["shared"])
        sent = celery.send_task("kit.add", (2, 3), queue="shared", task_id="from-celery")
        consumer = broker.consumer(["shared"], 1)
        try:
            got = consumer.fetch(1, 10.0)
            assert [d.message.task_id for d in got] == [sent.id]
            task = decode_task(got[0].message)
            assert (task.task_name, task.args) == ("kit.add", (2, 3))
            consumer.ack(got)
        finally:
            consumer.close()
    finally:
        with celery.pool.acquire() as conn:
            release(conn)
        celery.close()
        broker.close()
