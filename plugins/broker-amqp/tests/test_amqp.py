"""RabbitMQ broker: the conformance kit (classic and quorum queues), plus what only AMQP has:
Celery interop both ways, publisher confirms, batched acks, stale tags after a reconnect,
heartbeats while the loop thread is busy, the delay ladder, fork safety, the frame parser and
URL parsing. Everything talks to the real RabbitMQ on 127.0.0.1:5672, except the restart, which
stops a private node (`own_rabbit_node`): the shared server is never stopped or reconfigured."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import amqp
import pytest

from millpond.contracts.broker import Delivery, Outbound, dead_letter_queue
from millpond.exceptions import BrokerError, ConfigurationError, PublishError
from millpond.testing.broker_kit import BrokerContract, fetch_until
from millpond.testing.proxy import Proxy
from millpond.testing.servers import RabbitServer
from millpond.wire.protocol import DEATH_REASON, DELIVERY_COUNT, Message, decode_task, encode_task
from millpond_broker_amqp import AmqpBroker, AmqpConsumer, frames
from millpond_broker_amqp import consumer as amqp_consumer
from millpond_broker_amqp.section import SECTION, AmqpSettings
from millpond_broker_amqp.settings import parse
from millpond_broker_amqp.topology import DELAY_ETA, DELAY_TARGET, LEVELS, MAX_DELAY, delay_route

pytestmark = pytest.mark.amqp

URL = "amqp://guest:guest@127.0.0.1:5672//"
FAST = {"heartbeat": 2, "publish_retry_timeout": 5, "operation_timeout": 5}


# -- helpers ---------------------------------------------------------------------------------------


def unique(prefix: str = "mp-amqp") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def poll(
    check: Callable[[], Any],
    within: float,
    what: str | Callable[[], str],
    interval: float = 0.02,
) -> Any:
    """Call `check` until it returns something truthy; fail with `what` after `within` s."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what if isinstance(what, str) else what()} (waited {within} s)")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Admin:
    """A raw py-amqp connection for the test's own checks and clean-up (not the code under test)."""

    def __init__(self) -> None:
        self.conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
        self.conn.connect()
        self.created: list[str] = []

    def channel(self) -> amqp.Channel:
        chan = self.conn.channel()
        chan.auto_decode = False
        return chan

    def ready(self, queue: str) -> int:
        chan = self.conn.channel()
        try:
            return int(chan.queue_declare(queue, passive=True).message_count)
        except amqp.exceptions.NotFound:
            return -1
        finally:
            if chan.is_open:
                chan.close()

    def delete(self, queue: str) -> None:
        chan = self.conn.channel()
        for name in (queue, dead_letter_queue(queue)):
            chan.queue_delete(name)
        chan.exchange_delete(queue)
        chan.close()

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass  # a test restarted RabbitMQ under it
        if self.created:  # a fresh connection for the clean-up, for the same reason
            self.conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
            self.conn.connect()
            for name in self.created:
                self.delete(name)
            self.conn.close()


@pytest.fixture
def admin() -> Iterator[Admin]:
    helper = Admin()
    yield helper
    helper.close()


@pytest.fixture
def new_queue(admin: Admin) -> Callable[[], str]:
    """Unique queue names, deleted (with their dead-letter queue and exchange) afterwards."""

    def make() -> str:
        name = unique()
        admin.created.append(name)
        return name

    return make


@pytest.fixture
def make_amqp(admin: Admin) -> Iterator[Callable[..., AmqpBroker]]:
    made: list[AmqpBroker] = []

    def make(url: str = URL, **options: Any) -> AmqpBroker:
        broker = AmqpBroker(url, {**FAST, **options})
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.close()


def drain(consumer: AmqpConsumer, count: int, within: float = 5.0) -> list[Delivery]:
    got = fetch_until(consumer, count, within, max_count=64)
    assert len(got) == count, f"expected {count} deliveries within {within} s, got {len(got)}"
    return got


# -- the conformance kit ---------------------------------------------------------------------------


class _KitOnRabbit(BrokerContract):
    redelivery_slack = 5.0
    broadcast_ttl_while_listening = False

    @pytest.fixture
    def broker_url(self) -> str:
        return URL

    @pytest.fixture
    def lease_seconds(self) -> float:
        # RabbitMQ requeues a dead consumer's deliveries as soon as its connection drops
        return 1.0

    @pytest.fixture
    def make_queue(self, broker: Any, admin: Admin) -> Iterator[Callable[[], str]]:
        names: list[str] = []

        def make() -> str:
            name = f"millpond-kit-{uuid.uuid4().hex[:12]}"
            names.append(name)
            broker.declare([name])
            return name

        yield make
        for name in names:  # the kit only purges; on RabbitMQ the queues would pile up
            admin.delete(name)


class TestAmqpContract(_KitOnRabbit):
    @pytest.fixture
    def broker_options(self) -> dict[str, Any]:
        return dict(FAST)


class TestAmqpQuorumContract(_KitOnRabbit):
    @pytest.fixture
    def broker_options(self) -> dict[str, Any]:
        return {**FAST, "queue_type": "quorum"}


# -- settings and URLs -----------------------------------------------------------------------------


def test_url_parsing_and_defaults() -> None:
    s = parse("amqp://user:p%40ss@rabbit.example:5673/prod?heartbeat=15&queue_type=quorum")
    assert (s.host, s.port, s.userid, s.password) == ("rabbit.example", 5673, "user", "p@ss")
    assert (s.virtual_host, s.heartbeat, s.queue_type) == ("prod", 15.0, "quorum")
    assert "p@ss" not in repr(s)
    assert "p%40ss" not in repr(s)
    assert s.safe_url == "amqp://user:***@rabbit.example:5673/prod?heartbeat=15&queue_type=quorum"
    for url, vhost in [
        ("amqp://h", "/"),
        ("amqp://h/", "/"),
        ("amqp://h//", "/"),
        ("amqp://h/%2F", "/"),
        ("amqp://h/a%2Fb", "a/b"),
    ]:
        assert parse(url).virtual_host == vhost, url
    plain = parse("pyamqp://localhost")
    assert (plain.port, plain.userid, plain.tls, plain.publish_retry_timeout) == (
        5672,
        "guest",
        None,
        20.0,
    )
    tls = parse("amqps://u:secret@h/v", {"ssl_cert_reqs": "none"})
    assert tls.port == 5671
    assert tls.tls is not None
    assert parse("amqp://h", {"ssl": True}).tls is not None


def test_a_failover_url_lists_the_nodes_of_one_cluster() -> None:
    s = parse("amqp://u:pw@n1:5673/prod;amqp://u:pw@n2/prod?queue_type=quorum;amqp://u:pw@n3/prod")
    assert s.nodes == (("n1", 5673), ("n2", 5672), ("n3", 5672))
    assert s.quorum  # a member's query applies to the whole list
    assert "pw" not in s.safe_url and s.safe_url.count("***") == 3
    assert parse("amqp://h:1//").nodes == (("h", 1),)
    with pytest.raises(ConfigurationError, match="same user, password and virtual host"):
        parse("amqp://u:pw@n1/prod;amqp://u:other@n2/prod")
    with pytest.raises(ConfigurationError, match="must be an amqp"):
        parse("amqp://u:pw@n1/prod;redis://n2/0")


def test_a_failover_url_skips_dead_nodes_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    dead = free_port()  # nothing listens there
    broker = AmqpBroker(f"amqp://guest:guest@127.0.0.1:{dead}//;{URL}", {"connect_timeout": 2})
    try:
        caplog.set_level(logging.INFO, "millpond.broker.amqp")
        broker.connect()
        assert "node 2 of 2 in the broker URL" in caplog.text
    finally:
        broker.close()
    everything_dead = AmqpBroker(
        f"amqp://guest:guest@127.0.0.1:{dead}//;amqp://guest:guest@127.0.0.1:{free_port()}//",
        {"connect_timeout": 1, "publish_retry_timeout": 0},
    )
    with pytest.raises(BrokerError, match="any of the 2 RabbitMQ nodes"):
        everything_dead.connect()
    everything_dead.close()


def test_settings_section_defaults_are_the_parsers_defaults() -> None:
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="millpond.settings") if e.name == "amqp"]
    section = ep.load()
    defaults = {o.name: o.default for o in section.options}
    assert parse("amqp://h", defaults) == parse("amqp://h")  # the section adds nothing
    assert parse("amqps://h", defaults).tls is not None


def test_a_config_is_the_sections_values_plus_what_the_url_says() -> None:
    cfg = parse("amqp://h//?heartbeat=0&queue_type=quorum", {"connect_timeout": 3})
    assert isinstance(cfg, AmqpSettings)  # the defaults are the declaration's, not a copy
    declared = {f.name: getattr(cfg, f.name) for f in fields(AmqpSettings)}
    expected = {"heartbeat": 0.0, "queue_type": "quorum", "connect_timeout": 3.0}
    assert declared == {**SECTION.defaults(), **expected}
    assert parse("amqp://h?heartbeat=0", {"heartbeat": 7}).heartbeat == 7.0  # the mapping wins
    assert parse("amqps://h").ssl  # TLS is on, however it was asked for


@pytest.mark.parametrize(
    ("url", "options", "words"),
    [
        (
            "amqp://h",
            {"heartbeet": 5},
            "unknown setting 'amqp.heartbeet' (options) (did you mean 'heartbeat'?)",
        ),
        (
            "amqp://h?heartbeet=5",
            {},
            "unknown setting 'amqp.heartbeet' (in the query of amqp://h?heartbeet=5)",
        ),
        ("amqp://h", {"transport_options": {}}, "kombu's transport_options mean nothing here"),
        ("amqp://h?queue_type=stream", {}, "queue_type"),
        ("amqp://h", {"heartbeat": "soon"}, "heartbeat"),
        ("amqp://h", {"max_priority": 300}, "max_priority"),
        ("amqp://h", {"queue_type": "quorum", "max_priority": 5}, "cannot be combined"),
        ("amqp://h", {"confirm_publish": "maybe"}, "true or false"),
        ("amqp://h?confirm_publish=y", {}, "not a boolean"),
        ("redis://h", {}, "scheme"),
        ("amqp://h:99999", {}, "not a valid URL"),
        ("amqps://h", {"ssl_cert_reqs": "sometimes"}, "ssl_cert_reqs"),
    ],
)
def test_bad_settings_fail_early_and_clearly(url: str, options: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(words)):
        AmqpBroker(url, options)


def test_password_never_in_repr_or_errors() -> None:
    port = free_port()
    broker = AmqpBroker(f"amqp://guest:hunter2@127.0.0.1:{port}//", {"publish_retry_timeout": 0.2})
    assert "hunter2" not in repr(broker)
    with pytest.raises(BrokerError) as caught:
        broker.connect()
    assert "hunter2" not in str(caught.value)
    assert "***" in str(caught.value)
    assert "is the server" in str(caught.value)
    with pytest.raises(PublishError) as failed:
        broker.publish("q", encode_task("t", ()))
    assert "hunter2" not in str(failed.value)
    broker.close()


def test_wrong_password_and_unknown_vhost_are_clear() -> None:
    with pytest.raises(BrokerError, match="refused the credentials"):
        AmqpBroker("amqp://guest:wrong@127.0.0.1:5672//").connect()
    with pytest.raises(BrokerError, match="virtual host 'no-such-vhost'"):
        AmqpBroker("amqp://guest:guest@127.0.0.1:5672/no-such-vhost").connect()


# -- publishing ------------------------------------------------------------------------------------


def test_a_batch_waits_for_every_confirm_and_names_what_could_not_be_routed(
    make_amqp: Callable[..., AmqpBroker], new_queue: Callable[[], str], admin: Admin
) -> None:
    broker = make_amqp(declare_on_publish=False)
    there, missing = new_queue(), new_queue()
    broker.declare([there])
    batch = [Outbound(there, encode_task("t", (i,))) for i in range(20)]
    broker.publish_many(batch)
    # publish_many returned: the broker confirmed all 20, so all are in the queue already
    assert admin.ready(there) == 20
    with pytest.raises(PublishError, match=f"could not route 1 of 3 messages .*{missing}"):
        broker.publish_many([*batch[:2], Outbound(missing, encode_task("t", ()))])
    # the link survives; the routable two of the failed batch were stored
    broker.publish_many(batch[:2])
    assert poll(lambda: admin.ready(there) == 24, 5, "messages after a failed batch are missing")


def test_unroutable_publish_raises_instead_of_vanishing(
    make_amqp: Callable[..., AmqpBroker], new_queue: Callable[[], str], admin: Admin
) -> None:
    broker = make_amqp(declare_on_publish=False)
    missing = new_queue()
    with pytest.raises(PublishError, match="could not route"):
        broker.publish(missing, encode_task("t", ()))
    # the link survives: a declared queue takes the next message
    broker.declare([missing])
    broker.publish(missing, encode_task("t", ()))
    assert poll(lambda: admin.ready(missing) == 1, 5, "the message after a failed one is missing")


def test_unencodable_headers_raise_and_lose_nothing(
    make_amqp: Callable[..., AmqpBroker], new_queue: Callable[[], str], admin: Admin
) -> None:
    broker = make_amqp()
    queue = new_queue()
    broker.declare([queue])
    bad = encode_task("t", (), headers={"tags": {1, 2}})
    start = time.monotonic()
    with pytest.raises(PublishError, match="cannot be encoded"):
        broker.publish(queue, bad)
    assert time.monotonic() - start < 1.0, "a message that cannot be encoded was retried"
    broker.publish(queue, encode_task("t", ()))
    assert poll(lambda: admin.ready(queue) == 1, 5, "publish after an unencodable message failed")


def test_published_layout_is_celerys(
    make_amqp: Callable[..., AmqpBroker], new_queue: Callable[[], str], admin: Admin
) -> None:
    """Default exchange, routing key = queue, persistent, headers in application_headers."""
    broker = make_amqp()
    queue = new_queue()
    sent = encode_task("proj.add", (2, 3), reply_to="replies", priority=3)
    broker.publish(queue, sent)
    chan = admin.channel()
    got = poll(lambda: chan.basic_get(queue, no_ack=True), 5, "message not in the queue")
    assert got.delivery_info["exchange"] == ""
    assert got.delivery_info["routing_key"] == queue
    props = got.properties
    assert props["delivery_mode"] == 2
    assert props["correlation_id"] == sent.task_id
    assert props["reply_to"] == "replies"
    assert props["priority"] == 3
    assert props["content_type"] == "application/json"
    assert props["content_encoding"] == "utf-8"
    assert props["application_headers"]["task"] == "proj.add"
    assert got.body == sent.body
    # and the Celery-shaped topology: a direct exchange named like the queue, bound by name
    chan.basic_publish(amqp.Message(b"x"), exchange=queue, routing_key=queue)
    assert poll(lambda: admin.ready(queue) == 1, 5, "the queue is not bound to its exchange")
    chan.close()


def test_fork_safety(
    make_amqp: Callable[..., AmqpBroker], new_queue: Callable[[], str], admin: Admin
) -> None:
    broker = make_amqp()
    queue = new_queue()
    broker.publish(queue, encode_task("t", (), task_id="parent-1"))
    pid = os.fork()
    if pid == 0:  # the child publishes on its own connection, then leaves without cleanup
        code = 1
        try:
            broker.publish(queue, encode_task("t", (), task_id="child"))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "publishing in a forked child failed"
    broker.publish(queue, encode_task("t", (), task_id="parent-2"))  # parent's link still fine
    poll(lambda: admin.ready(queue) == 3, 5, "expected 3 messages after publishing around a fork")


# -- consuming -------------------------------------------------------------------------------------


def test_out_of_order_and_duplicate_acks(
    make_amqp: Callable[..., AmqpBroker], new_queue: Callable[[], str], admin: Admin
) -> None:
    broker = make_amqp()
    queue = new_queue()
    for i in range(8):
        broker.publish(queue, encode_task("t", (i,)))
    consumer = broker.consumer([queue], 8)
    try:
        got = drain(consumer, 8)
        generation = consumer.generation
        consumer.ack(got[1::2])  # the gaps force single acks
        consumer.ack(got[0::2])  # closes the gaps: one multiple ack
        consumer.ack(got[:3])  # acked twice: ignored, not a channel error
        assert consumer.fetch(8, 0.3) == []
        assert consumer.generation == generation, "an ack broke the channel"
    finally:
        consumer.close()
    assert admin.ready(queue) == 0, "some acks were lost: messages came back on close"


def test_stale_acks_after_a_reconnect_never_ack_the_wrong_message(
    make_amqp: Callable[..., AmqpBroker], new_queue: Callable[[], str], admin: Admin
) -> None:
    broker = make_amqp()
    queue = new_queue()
    broker.publish(queue, encode_task("t", (), task_id="A"))
    broker.publish(queue, encode_task("t", (), task_id="B"))
    consumer = broker.consumer([queue], 4)
    try:
        old = drain(consumer, 2)
        first = consumer.generation
        consumer._sock.shutdown(socket.SHUT_RDWR)  # the connection dies under the consumer
        again = drain(consumer, 2, within=10)
        assert consumer.generation > first, "the consumer did not reconnect"
        assert sorted(d.message.task_id or "" for d in again) == ["A", "B"]
        assert all(d.redelivered and d.delivery_count >= 2 for d in again)
        # the old tags (1, 2) equal the new ones: acking them must not touch the new deliveries
        consumer.ack(old)
        consumer.reject(old[0], requeue=False, reason="stale")
        consumer.ack([d for d in again if d.message.task_id == "B"])
    finally:
        consumer.close()
    assert poll(lambda: admin.ready(queue) == 1, 5, "A must be back in the queue (not acked)")
    assert admin.ready(dead_letter_queue(queue)) == 0, "a stale reject dead-lettered a message"


_LOST_COUNT = re.compile(
    r"redelivers the (\d+) deliveries it never saw acknowledged \((\d+) never acknowledged, "
    r"(\d+) acknowledged into the lost connection\)"
)


def test_acks_count_as_delivered_only_once_rabbitmq_proved_it_has_them(
    make_amqp: Callable[..., AmqpBroker],
    new_queue: Callable[[], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An ack written into a dead link is not delivered: the count logged on the lost
    connection is exactly what RabbitMQ then redelivers, proven acks excluded."""
    with Proxy(("127.0.0.1", 5672)) as proxy:
        broker = make_amqp(f"amqp://guest:guest@127.0.0.1:{proxy.port}//")
        queue = new_queue()
        for name in "ABCDE":
            broker.publish(queue, encode_task("t", (), task_id=name))
        consumer = broker.consumer([queue], 8)
        try:
            held = {d.message.task_id: d for d in drain(consumer, 5)}
            consumer.ack([held["A"], held["B"]])
            # the probe sent with those acks comes back: RabbitMQ has them
            poll(lambda: consumer.fetch(1, 0.05) == [] and not consumer._unproven, 5, "a proof")
            proxy.stall()
            consumer.ack([held["C"], held["D"]])  # into the black hole: never arrives
            assert set(consumer._unproven) == {held["C"].tag[1], held["D"].tag[1]}
            proxy.reset()  # the link dies with the two acks unread
            proxy.resume()
            again = drain(consumer, 3, within=15)
            line = _LOST_COUNT.search(caplog.text)
            assert line is not None, caplog.text
            assert tuple(int(n) for n in line.groups()) == (3, 1, 2)
            assert sorted(d.message.task_id or "" for d in again) == ["C", "D", "E"]
            assert all(d.redelivered for d in again)
            consumer.ack(again)
            assert consumer.fetch(4, 0.3) == []
        finally:
            consumer.close()


def test_under_load_the_prefetch_window_proves_acks_without_probes(
    make_amqp: Callable[..., AmqpBroker],
    new_queue: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RabbitMQ sends delivery T only while fewer than `prefetch` are unacked: receiving it proves
    the acks that made room, so a busy consumer needs no probe (here: none may go out)."""
    monkeypatch.setattr(amqp_consumer, "_PROBE_GAP", 3600.0)
    broker = make_amqp()
    queue = new_queue()
    for i in range(6):
        broker.publish(queue, encode_task("t", (), task_id=f"m{i}"))
    consumer = broker.consumer([queue], 2)
    try:
        first = drain(consumer, 2)
        consumer._probe_sent = time.monotonic()  # the first probe would be "due": not now
        for _ in range(4):
            consumer.ack([first.pop(0)])
            assert len(consumer._unproven) == 1  # written, not shown to have arrived
            first += drain(consumer, 1)  # the delivery the ack made room for...
            assert not consumer._unproven, "...proves RabbitMQ had the ack"
        consumer.ack(first)
    finally:
        consumer.close()


def test_quorum_queues_count_redeliveries_exactly(
    make_amqp: Callable[..., AmqpBroker], new_queue: Callable[[], str]
) -> None:
    broker = make_amqp(queue_type="quorum")
    queue = new_queue()
    broker.declare([queue])
    broker.publish(queue, encode_task("t", (), task_id="q1"))
    for expected in (1, 2, 3):
        consumer = broker.consumer([queue], 1)
        try:
            (delivery,) = drain(consumer, 1)
            assert delivery.delivery_count == expected
            assert delivery.redelivered is (expected > 1)
        finally:
            consumer.close()  # unacked: RabbitMQ returns it and bumps x-delivery-count
    consumer = broker.consumer([queue], 1)
    try:
        (delivery,) = drain(consumer, 1)
        consumer.reject(delivery, requeue=True)
        (back,) = drain(consumer, 1)
        assert back.delivery_count == 5
        assert "x-delivery-count" not in back.message.headers
        assert back.message.headers[DELIVERY_COUNT] == 4
        consumer.ack([back])
    finally:
        consumer.close()


def test_priorities_with_max_priority(
    make_amqp: Callable[..., AmqpBroker], new_queue: Callable[[], str]
) -> None:
    broker = make_amqp(max_priority=9)
    queue = new_queue()
    broker.declare([queue])
    broker.publish(queue, encode_task("t", (), task_id="low", priority=1))
    broker.publish(queue, encode_task("t", (), task_id="high", priority=9))
    consumer = broker.consumer([queue], 1)
    try:
        order = []
        for _ in range(2):
            (d,) = drain(consumer, 1)
            order.append(d.message.task_id)
            consumer.ack([d])
        assert order == ["high", "low"]
    finally:
        consumer.close()


def test_large_message_spanning_many_frames(
    make_amqp: Callable[..., AmqpBroker], new_queue: Callable[[], str]
) -> None:
    broker = make_amqp()
    queue = new_queue()
    body = os.urandom(1_000_000)  # frame_max is 128 KiB: 8 body frames
    broker.publish(queue, Message(body=body, headers={"id": "big", "task": "t"}))
    broker.publish(queue, Message(body=b"", headers={"id": "empty", "task": "t"}))
    consumer = broker.consumer([queue], 4)
    try:
        got = drain(consumer, 2)
        assert [d.message.body for d in got] == [body, b""]
        consumer.ack(got)
    finally:
        consumer.close()


def test_declare_conflict_is_explained(
    make_amqp: Callable[..., AmqpBroker], new_queue: Callable[[], str]
) -> None:
    queue = new_queue()
    make_amqp().declare([queue])
    quorum = make_amqp(queue_type="quorum")
    with pytest.raises(BrokerError, match="queue_type"):
        quorum.declare([queue])
    with pytest.raises(BrokerError, match="queue_type"):
        quorum.consumer([queue], 1)
    quorum.declare([new_queue()])  # the link recovered from the channel error


def test_dead_letters_peek_in_order_and_replay_resets_counts(
    make_amqp: Callable[..., AmqpBroker], new_queue: Callable[[], str]
) -> None:
    broker = make_amqp()
    queue = new_queue()
    for i in range(3):
        broker.publish(queue, encode_task("t", (i,), task_id=f"d{i}"))
    consumer = broker.consumer([queue], 3)
    try:
        for d in drain(consumer, 3):
            consumer.reject(d, requeue=False, reason=f"bad {d.message.task_id}")
        peek = broker.dead_letters(queue)
        assert [m.task_id for m in peek] == ["d0", "d1", "d2"]
        assert [m.headers[DEATH_REASON] for m in peek] == ["bad d0", "bad d1", "bad d2"]
        assert [m.task_id for m in broker.dead_letters(queue, limit=2)] == ["d0", "d1"]
        assert broker.replay_dead_letters(queue, limit=2) == 2
        assert [m.task_id for m in broker.dead_letters(queue)] == ["d2"]
        back = drain(consumer, 2)
        assert [d.message.task_id for d in back] == ["d0", "d1"]
        assert all(DEATH_REASON not in d.message.headers for d in back)
        assert [d.delivery_count for d in back] == [1, 1], "replay starts the count afresh"
        consumer.ack(back)
        assert broker.replay_dead_letters(queue) == 1
        assert broker.replay_dead_letters(queue) == 0
    finally:
        consumer.close()


# -- delays ----------------------------------------------------------------------------------------


def test_delay_route_rounds_up_and_caps() -> None:
    assert delay_route(0) is None
    assert delay_route(-5) is None
    top, key = delay_route(0.01) or (0, "")
    assert top == 0
    assert key.split(".") == ["0"] * (LEVELS - 1) + ["1"]
    top, key = delay_route(1.0) or (0, "")  # 10 units = 0b1010
    assert top == 3
    assert key.split(".") == ["0"] * (LEVELS - 4) + ["1", "0", "1", "0"]
    top, _ = delay_route(MAX_DELAY * 10) or (0, "")
    assert top == LEVELS - 1


def test_delays_do_not_queue_behind_longer_ones(
    make_amqp: Callable[..., AmqpBroker], new_queue: Callable[[], str], admin: Admin
) -> None:
    broker = make_amqp()
    queue = new_queue()
    broker.declare([queue])
    start = time.time()
    broker.publish(queue, encode_task("t", (), task_id="long"), eta=start + 30)
    broker.publish(queue, encode_task("t", (), task_id="short"), eta=start + 0.5)
    # held by RabbitMQ, in the level queues, not in this process
    assert admin.ready(queue) == 0
    consumer = broker.consumer([queue], 4)
    try:
        (d,) = drain(consumer, 1, within=5)
        arrived = time.time()
        assert d.message.task_id == "short", "the short delay waited behind the long one"
        assert start + 0.5 <= arrived < start + 3.0, arrived - start
        assert DELAY_TARGET not in d.message.headers
        assert DELAY_ETA not in d.message.headers
        assert not any(k.startswith(("x-death", "x-first")) for k in d.message.headers)
        assert decode_task(d.message).task_name == "t"
        consumer.ack([d])
    finally:
        consumer.close()
    # "long" stays in a level queue; when it comes down, its queue is gone and it is dropped


def test_early_arrival_goes_round_again(
    make_amqp: Callable[..., AmqpBroker], new_queue: Callable[[], str]
) -> None:
    """A delay longer than the ladder holds arrives early and is sent round again, not run."""
    broker = make_amqp()
    queue = new_queue()
    broker.declare([queue])
    eta = time.time() + 1.0
    early = encode_task("t", (), task_id="early", headers={DELAY_TARGET: queue, DELAY_ETA: eta})
    broker.publish(queue, early)  # straight into the queue, as if it came off the ladder
    consumer = broker.consumer([queue], 4)
    try:
        (d,) = drain(consumer, 1, within=6)
        assert time.time() >= eta - 0.01, "delivered before its eta"
        assert d.message.task_id == "early"
        assert DELAY_ETA not in d.message.headers
        consumer.ack([d])
    finally:
        consumer.close()


# -- interop with Celery and kombu -----------------------------------------------------------------


def test_celery_producer_to_millpond_consumer(
    make_amqp: Callable[..., AmqpBroker], new_queue: Callable[[], str]
) -> None:
    from celery import Celery

    queue = new_queue()
    app = Celery("interop", broker="pyamqp://guest:guest@127.0.0.1:5672//")
    try:
        # Celery declares the queue first (its way); millpond must accept that declaration
        result = app.send_task("proj.add", args=(2, 3), kwargs={"z": "ü"}, queue=queue)
        broker = make_amqp()
        broker.declare([queue])
        consumer = broker.consumer([queue], 1)
        try:
            (d,) = drain(consumer, 1)
            task = decode_task(d.message)
            assert (task.task_id, task.task_name, task.args, task.kwargs) == (
                result.id,
                "proj.add",
                (2, 3),
                {"z": "ü"},
            )
            assert d.message.properties["correlation_id"] == result.id
            assert d.delivery_count == 1
            consumer.ack([d])
        finally:
            consumer.close()
    finally:
        app.close()


@pytest.mark.slow
def test_millpond_producer_to_celery_worker(
    make_amqp: Callable[..., AmqpBroker], new_queue: Callable[[], str], tmp_path: Path
) -> None:
    queue = new_queue()
    broker = make_amqp()
    broker.declare([queue])  # millpond declares first; the Celery worker's declare must agree
    (tmp_path / "interop_app.py").write_text(
        textwrap.dedent(
            """
            import json
            from celery import Celery

            app = Celery("interop", broker="pyamqp://guest:guest@127.0.0.1:5672//")
            app.conf.worker_hijack_root_logger = False

            @app.task(name="interop.record")
            def record(path, value):
                with open(path, "w") as f:
                    json.dump(value, f)
            """
        )
    )
    now, later = tmp_path / "now.json", tmp_path / "later.json"
    broker.publish(queue, encode_task("interop.record", (str(now), {"n": 1, "s": "ü"})))
    eta = time.time() + 1.0
    broker.publish(queue, encode_task("interop.record", (str(later), [2])), eta=eta)
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "interop_app",
                "worker",
                "-P",
                "solo",
                "-Q",
                queue,
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
                "--loglevel",
                "WARNING",
            ],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(tmp_path)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def ran(path: Path) -> bool:
        if proc.poll() is not None:
            pytest.fail(f"the Celery worker exited with {proc.returncode}:\n{log.read_text()}")
        return path.exists() and bool(path.read_text())

    try:
        poll(lambda: ran(now), 30, lambda: f"the Celery worker did not run it:\n{log.read_text()}")
        assert json.loads(now.read_text()) == {"n": 1, "s": "ü"}
        poll(lambda: ran(later), 10, "the delayed task never ran")
        assert later.stat().st_mtime >= eta - 0.05
        assert json.loads(later.read_text()) == [2]
    finally:
        proc.kill()  # nothing runs any more; Celery's own shutdown takes ~10 s here
        proc.wait(10)


def test_quorum_declarations_match_celerys(
    make_amqp: Callable[..., AmqpBroker], new_queue: Callable[[], str]
) -> None:
    from kombu import Connection, Exchange, Queue

    queue = new_queue()
    with Connection("pyamqp://guest:guest@127.0.0.1:5672//") as conn:
        celery_queue = Queue(
            queue, Exchange(queue), queue, queue_arguments={"x-queue-type": "quorum"}
        )
        celery_queue(conn.default_channel).declare()
        make_amqp(queue_type="quorum").declare([queue])  # no PRECONDITION_FAILED either way
        celery_queue(conn.default_channel).declare()


# -- the frame parser ------------------------------------------------------------------------------


def _frame(ftype: int, channel: int, payload: bytes) -> bytes:
    return (
        bytes([ftype])
        + channel.to_bytes(2, "big")
        + len(payload).to_bytes(4, "big")
        + payload
        + b"\xce"
    )


def _deliver(channel: int, tag: int, body: bytes, chunk: int = 5) -> bytes:
    method = (
        (60).to_bytes(2, "big")
        + (60).to_bytes(2, "big")
        + b"\x03ctg"
        + tag.to_bytes(8, "big")
        + b"\x01"
        + b"\x02ex"
        + b"\x02rk"
    )
    header = (60).to_bytes(2, "big") + b"\0\0" + len(body).to_bytes(8, "big") + b"\x80\x00\x04text"
    out = _frame(1, channel, method) + _frame(2, channel, header)
    for i in range(0, len(body), chunk):
        out += _frame(3, channel, body[i : i + chunk])
    return out


def test_the_ack_probe_is_the_consumers_own_basic_qos() -> None:
    method = amqp.spec.Basic.Qos
    frame = frames.qos_frame(3, 16, True)
    head, payload = frame[:7], frame[7:-1]
    assert (head[0], int.from_bytes(head[1:3]), int.from_bytes(head[3:7])) == (1, 3, len(payload))
    assert (int.from_bytes(payload[:2]), int.from_bytes(payload[2:4])) == method
    args, _ = amqp.serialization.loads("lBb", payload[4:], 0)
    assert args == [0, 16, True]
    assert frame[-1] == 0xCE


def test_frame_parser_only_takes_whole_deliveries() -> None:
    stream = (
        _deliver(1, 1, b"hello world, in three frames")
        + _frame(8, 0, b"")
        + _deliver(1, 2, b"")
        + _frame(1, 0, b"\x00\x0a\x00\x32")  # a connection method: handed back
        + _frame(1, 1, b"\x00\x3c\x00\x0b")  # basic.qos-ok, a probe's answer: counted
        + _deliver(1, 3, b"x" * 12)
    )
    for cut in range(len(stream) + 1):
        out: list[frames.RawDelivery] = []
        data, pos, others, oks = stream[:cut], 0, [], 0
        while True:
            pos, frame, _, answered = frames.parse(data, pos, 1, out)
            oks += answered
            if frame is None:
                break
            others.append(frame)
        tags = [d.delivery_tag for d in out]
        assert tags == [1, 2, 3][: len(tags)], f"cut at {cut}: {tags}"
        if cut == len(stream):
            assert pos == len(stream)
            assert [d.body for d in out] == [b"hello world, in three frames", b"", b"x" * 12]
            assert (out[0].consumer_tag, out[0].redelivered) == (b"ctg", True)
            assert out[0].exchange == b"ex"
            assert [(f.frame_type, f.channel) for f in others] == [(1, 0)]
            assert oks == 1
        else:
            assert pos <= cut
    corrupt, pos = stream[:-1] + b"\x00", 0
    with pytest.raises(amqp.exceptions.UnexpectedFrame):
        while True:
            pos, frame, _, _ = frames.parse(corrupt, pos, 1, [])
            if frame is None:
                break


def test_fast_property_decoder_matches_py_amqp() -> None:
    from datetime import datetime
    from decimal import Decimal

    from amqp.serialization import decode_properties_basic

    from millpond.testing.broker_kit import sample_message
    from millpond_broker_amqp.codec import to_amqp
    from millpond_broker_amqp.wire import decode_properties

    odd = {
        "d": Decimal("1.25"),
        "t": datetime(2024, 1, 1, 12),
        "b": b"\xff\x00",
        "neg": -(2**40),
        "nest": [[], {}, {"a": [None, True, 0.5]}],
    }
    messages = [
        to_amqp(sample_message()),
        to_amqp(encode_task("a.b", (1, 2), {"x": [1, 2.5]}, reply_to="r", priority=4)),
        amqp.Message(
            b"",
            application_headers=odd,
            message_id="m",
            timestamp=1234567,
            type="tt",
            app_id="app",
            user_id="guest",
            expiration="100",
            content_type="ct",
        ),
    ]
    for message in messages:
        header = b"\0" * 12 + message._serialize_properties()
        theirs, _ = decode_properties_basic(header, 12)
        ours = decode_properties(header, 12)
        assert ours == theirs
        assert {k: type(v) for k, v in ours.items()} == {k: type(v) for k, v in theirs.items()}


# -- heartbeats while the loop thread is busy, and a RabbitMQ restart ------------------------------


@pytest.mark.slow
def test_heartbeats_are_served_while_the_loop_thread_is_busy(
    make_amqp: Callable[..., AmqpBroker], new_queue: Callable[[], str], admin: Admin
) -> None:
    broker = make_amqp(heartbeat=2)
    queue = new_queue()
    broker.publish(queue, encode_task("t", (), task_id="long"))
    broker.publish(queue, encode_task("t", (), task_id="next"))
    consumer = broker.consumer([queue], 1)
    try:
        (held,) = drain(consumer, 1)
        generation = consumer.generation
        time.sleep(7)  # the "task": the loop thread does not touch the consumer for 3.5 heartbeats
        consumer.ack([held])
        (nxt,) = drain(consumer, 1)
        assert consumer.generation == generation, "the connection was lost while the task ran"
        assert (nxt.message.task_id, nxt.delivery_count) == ("next", 1)
        consumer.ack([nxt])
    finally:
        consumer.close()
    assert admin.ready(queue) == 0, "the ack after the long task did not reach RabbitMQ"


@pytest.mark.fault
@pytest.mark.slow
def test_consumer_and_publisher_survive_a_rabbitmq_restart(
    own_rabbit_node: RabbitServer, make_amqp: Callable[..., AmqpBroker]
) -> None:
    """The restart is of a private node's rabbit application (never the shared server's)."""
    broker = make_amqp(own_rabbit_node.url(), publish_retry_timeout=30)
    queue = unique()
    broker.publish(queue, encode_task("t", (), task_id="before"))
    consumer = broker.consumer([queue], 4)
    outcome: list[BaseException | None] = []
    try:
        (old,) = drain(consumer, 1)
        first = consumer.generation
        publisher = threading.Thread(target=lambda: None)
        with own_rabbit_node.app_stopped():

            def publish_during_outage() -> None:
                try:
                    broker.publish(queue, encode_task("t", (), task_id="during"))
                    outcome.append(None)
                except PublishError as exc:
                    outcome.append(exc)

            publisher = threading.Thread(target=publish_during_outage)
            publisher.start()
            for _ in range(3):  # fetch keeps returning while the server is down
                assert consumer.fetch(4, 0.2) == []
        publisher.join(60)
        assert outcome, "the publish during the outage never returned"
        expected = {"before"} if isinstance(outcome[0], PublishError) else {"before", "during"}
        got = fetch_until(consumer, len(expected), 30, max_count=4)
        assert {d.message.task_id for d in got} == expected
        assert consumer.generation > first
        back = next(d for d in got if d.message.task_id == "before")
        assert back.redelivered
        assert back.delivery_count >= 2
        consumer.ack([old])  # from the dead connection: dropped, never acks a new delivery
        consumer.ack(got)
        assert consumer.fetch(4, 0.3) == []
    finally:
        consumer.close()


def test_the_private_node_shares_nothing_with_the_shared_server(rabbit_node: RabbitServer) -> None:
    """A user added on the session's private node does not exist on the shared server, and a
    queue declared on one is not on the other: the fixture never reconfigures 127.0.0.1:5672."""
    user, password = unique("user"), uuid.uuid4().hex
    rabbit_node.add_user(user, password)
    assert rabbit_node.node.startswith("mp-") and rabbit_node.port != 5672
    private = amqp.Connection(f"127.0.0.1:{rabbit_node.port}", userid=user, password=password)
    private.connect()
    with pytest.raises(amqp.exceptions.AccessRefused):
        amqp.Connection("127.0.0.1:5672", userid=user, password=password).connect()
    queue = unique()
    try:
        private.channel().queue_declare(queue, auto_delete=True)
        shared = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
        shared.connect()
        with pytest.raises(amqp.exceptions.NotFound):
            shared.channel().queue_declare(queue, passive=True)
        shared.close()
    finally:
        private.close()


def test_consumers_reject_bad_arguments(make_amqp: Callable[..., AmqpBroker]) -> None:
    broker = make_amqp()
    with pytest.raises(ValueError, match="prefetch"):
        broker.consumer(["q"], 0)
    with pytest.raises(ValueError, match="at least one queue"):
        broker.consumer([], 1)
    with pytest.raises(TypeError, match="not the string"):
        broker.consumer("q", 1)  # type: ignore[arg-type]
    with pytest.raises(BrokerError, match=r"amq\."):
        broker.declare(["amq.mine"])
    with pytest.raises(PublishError, match="non-empty"):
        broker.publish("", encode_task("t", ()))
