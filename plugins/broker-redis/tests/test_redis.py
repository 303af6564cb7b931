"""Redis broker: the conformance kit, plus what only Redis has.

kombu/Celery interop both ways, one round trip per batch, priorities, delays that wake a waiting
consumer, dead-lettering of unreadable entries, a Redis restart (against a private redis-server
with AOF on a free port: the shared server on 6379 is never restarted), TLS and sentinel against
private servers, fork safety, and URL/option parsing with password masking.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from millpond.contracts.backend import ResultMeta
from millpond.contracts.broker import QueueStats, mask_url
from millpond.contracts.waking import Waker
from millpond.exceptions import AccessDenied, BackendError, ConfigurationError, PublishError
from millpond.states import TaskState
from millpond.testing.broker_kit import BrokerContract, fetch_until
from millpond.testing.servers import REDIS_SERVER, RedisServer, free_port, make_certs
from millpond.wire.protocol import DEATH_REASON, Message, decode_task, encode_task
from millpond_broker_redis import RedisBroker, RedisResultBackend, parse
from millpond_broker_redis.config import mask

pytestmark = pytest.mark.redis

REDIS_URL = "redis://127.0.0.1:6379/0"
LEASE = {"lease_timeout": 1.0, "heartbeat_interval": 0.2}


class TestRedisContract(BrokerContract):
    redelivery_slack = 3.0

    @pytest.fixture
    def broker_url(self) -> str:
        return REDIS_URL

    @pytest.fixture
    def broker_options(self) -> dict[str, Any]:
        # the kit checks that the broker can hold a delay; `delays = auto` holds one only while
        # a millpond worker serves the queue (tested below)
        return {**LEASE, "delays": "broker"}


# -- helpers ---------------------------------------------------------------------------------------


def unique(prefix: str = "redis-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def wait_for(check: Callable[[], Any], within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {within} s")
        time.sleep(0.01)


class ReplyCutter:
    """A TCP proxy in front of Redis that, when armed, lets the next request through but cuts
    the connection instead of passing the reply back: "Redis ran the command, the client never
    heard"."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.armed = threading.Event()
        self.cut = threading.Event()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        import select

        try:
            while not self.closed:
                ready, _, _ = select.select([client, server], [], [], 0.5)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is server and self.armed.is_set():
                        self.armed.clear()
                        self.cut.set()
                        return  # the reply is dropped and both ends are closed
                    (server if sock is client else client).sendall(data)
        except OSError:
            return
        finally:
            client.close()
            server.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()


def client_of(server: RedisServer) -> redis.Redis:
    """A client of a private server (the core's helper starts it without a client library)."""
    return redis.Redis(port=server.port, password=server.password)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", password="s3cret-pw").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def shared() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def broker() -> Iterator[RedisBroker]:
    b = RedisBroker(REDIS_URL, dict(LEASE))
    yield b
    b.close()


@pytest.fixture
def queue(shared: redis.Redis) -> Iterator[str]:
    name = unique()
    yield name
    keys = list(shared.scan_iter(match=f"*{name}*"))
    if keys:
        shared.delete(*keys)


def drain(consumer: Any, count: int, within: float = 5.0, max_count: int = 64) -> list[Any]:
    got = fetch_until(consumer, count, within, max_count=max_count)
    if got:
        consumer.ack(got)
    return got


# -- kombu and Celery share the queues -------------------------------------------------------------


def test_celery_producer_message_is_consumed_and_decodes(
    broker: RedisBroker, queue: str, shared: redis.Redis
) -> None:
    from celery import Celery

    app = Celery("interop", broker=REDIS_URL)
    try:
        sent = app.send_task("interop.add", args=(2, 3), kwargs={"k": "ü"}, queue=queue)
    finally:
        app.close()
    consumer = broker.consumer([queue], 4)
    try:
        got = fetch_until(consumer, 1, 5.0)
        assert len(got) == 1, "a message sent by Celery was not consumed"
        task = decode_task(got[0].message)
        assert (task.task_id, task.task_name, task.args, task.kwargs) == (
            sent.id,
            "interop.add",
            (2, 3),
            {"k": "ü"},
        )
        assert got[0].delivery_count == 1
        consumer.ack(got)
    finally:
        consumer.close()
        shared.delete(f"_kombu.binding.{queue}")


def test_kombu_simplequeue_message_is_consumed(broker: RedisBroker, queue: str) -> None:
    from kombu import Connection

    with Connection(REDIS_URL) as conn:
        q = conn.SimpleQueue(queue)
        q.put({"hello": "wörld"}, headers={"id": "k-1", "task": "kombu.t"}, serializer="json")
        q.close()
    consumer = broker.consumer([queue], 1)
    try:
        got = fetch_until(consumer, 1, 5.0)
        assert len(got) == 1
        message = got[0].message
        assert json.loads(message.body) == {"hello": "wörld"}
        assert message.content_type == "application/json"
        assert message.headers == {"id": "k-1", "task": "kombu.t"}
        consumer.ack(got)
    finally:
        consumer.close()


def test_millpond_message_is_received_by_a_kombu_consumer(broker: RedisBroker, queue: str) -> None:
    from kombu import Connection

    sent = encode_task("interop.mul", (6, 7), {"x": [1, None]}, headers={"traceparent": "00-ab"})
    broker.publish(queue, sent)
    with Connection(REDIS_URL) as conn:
        q = conn.SimpleQueue(queue)
        try:
            received = q.get(block=True, timeout=5)
            assert received.body == sent.body
            assert received.headers == sent.headers
            assert received.content_type == sent.content_type
            assert received.properties["correlation_id"] == sent.task_id
            received.ack()
        finally:
            q.close()


def test_priorities_use_kombus_lists_and_order(broker: RedisBroker, queue: str) -> None:
    from kombu import Connection

    # kombu's Redis emulation: lower numbers are served first; 0..2 share the plain list
    for priority in (9, 5, 0):
        broker.publish(queue, encode_task("p", task_id=f"p{priority}", priority=priority))
    with Connection(REDIS_URL) as conn:
        q = conn.SimpleQueue(queue)
        try:
            order = []
            for _ in range(3):
                m = q.get(block=True, timeout=5)
                order.append(m.headers["id"])
                m.ack()
        finally:
            q.close()
    assert order == ["p0", "p5", "p9"], f"kombu saw millpond's priorities as {order}"

    with Connection(REDIS_URL) as conn:
        producer = conn.Producer()
        for priority in (9, 1, 4):
            producer.publish(
                {"n": priority},
                routing_key=queue,
                priority=priority,
                headers={"id": f"k{priority}"},
                serializer="json",
            )
    consumer = broker.consumer([queue], 8)
    try:
        got = drain(consumer, 3)
        assert [d.message.task_id for d in got] == ["k1", "k4", "k9"]
    finally:
        consumer.close()


def test_celery_reads_a_result_stored_here_and_vice_versa(broker: RedisBroker) -> None:
    from celery import Celery
    from celery.result import AsyncResult

    backend = broker.default_backend()
    app = Celery("interop", broker=REDIS_URL, backend=REDIS_URL)
    ours, theirs = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        backend.store(ResultMeta(task_id=ours, status=TaskState.SUCCESS, result={"v": [1, 2]}))
        assert AsyncResult(ours, app=app).get(timeout=5) == {"v": [1, 2]}
        app.backend.store_result(theirs, 42, TaskState.SUCCESS)
        meta = backend.get(theirs, 5.0)
        assert meta is not None
        assert (meta.status, meta.result, meta.task_id) == (TaskState.SUCCESS, 42, theirs)
    finally:
        backend.forget(ours)
        backend.forget(theirs)
        backend.close()
        app.close()


# -- batching, blocking, delays --------------------------------------------------------------------


def test_a_batch_fetch_and_a_batch_ack_are_one_round_trip_each(private_redis: RedisServer) -> None:
    url = f"redis://:{private_redis.password}@127.0.0.1:{private_redis.port}/0"
    broker = RedisBroker(url, {"heartbeat_interval": 30, "lease_timeout": 60})
    server = client_of(private_redis)
    queue = unique()
    try:
        for i in range(200):
            broker.publish(queue, encode_task("batch", (i,)))
        consumer = broker.consumer([queue], 64)
        calls: list[str] = []
        client = consumer._client  # count what this consumer sends: each call is one round trip
        real = client.execute_command

        def counting(*args: Any, **kwargs: Any) -> Any:
            calls.append(str(args[0]))
            return real(*args, **kwargs)

        client.execute_command = counting  # type: ignore[method-assign]
        consumer.ack(consumer.fetch(1, 1.0))  # loads the script (EVALSHA, SCRIPT LOAD, EVALSHA)
        calls.clear()
        server.config_resetstat()
        batch = consumer.fetch(64, 1.0)
        assert len(batch) == 64
        assert calls == ["EVALSHA"], f"fetch(64) sent {calls}"
        calls.clear()
        consumer.ack(batch)
        assert calls == ["HDEL"], f"ack of 64 sent {calls}"
        stats = server.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 1
        assert stats["cmdstat_hdel"]["calls"] == 1
        consumer.close()
    finally:
        broker.close()


def test_queue_stats_count_ready_delayed_reserved_and_consumers(
    broker: RedisBroker, queue: str
) -> None:
    other = unique()
    try:
        for i in range(5):
            broker.publish(queue, encode_task("stats", (i,), priority=i * 2))
        broker.publish(other, encode_task("stats", ()))
        broker.publish(queue, encode_task("stats", ()), eta=time.time() + 600)
        assert broker.queue_stats(queue) == QueueStats(queue, 5, delayed=1, reserved=0, consumers=0)
        consumer = broker.consumer([queue, other], 8)
        try:
            got = fetch_until(consumer, 3, 5.0, max_count=3)
            stats = broker.queue_stats(queue)
            mine = sum(1 for d in got if d.queue == queue)
            assert (stats.ready, stats.reserved, stats.consumers) == (5 - mine, mine, 1)
            consumer.ack(got)
            assert broker.queue_stats(queue).reserved == 0
        finally:
            consumer.close()
    finally:
        broker.purge(other)


def test_a_publish_refused_with_noreplicas_is_retried_then_explained(tmp_path: Path) -> None:
    """min-replicas-to-write (the setting that bounds a Sentinel failover's window) makes a
    primary without a replica in sync refuse writes with NOREPLICAS: a publish retries that
    like an outage, and says what it means when it gives up."""
    server = RedisServer(tmp_path / "noreplicas")
    server.extra = ["--port", str(server.port), "--min-replicas-to-write", "1"]
    server.start()
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        broker = RedisBroker(url, {"publish_retry_timeout": 0.3, "warn_without_persistence": False})
        queue = unique()
        began = time.monotonic()
        with pytest.raises(PublishError, match=r"kept refusing it.*NOREPLICAS"):
            broker.publish(queue, encode_task("refused", ()))
        assert time.monotonic() - began >= 0.3  # retried, not failed at the first reply
        client_of(server).config_set("min-replicas-to-write", 0)
        broker.publish(queue, encode_task("accepted", ()))
        assert broker.queue_length(queue) == 1
        broker.close()
    finally:
        server.stop()


def test_a_reservation_whose_ack_was_lost_goes_back_to_its_queue(
    broker: RedisBroker, queue: str, shared: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A Sentinel failover can lose an ack the old primary took: the new primary still holds the
    entry in the consumer's unacked hash, which the consumer no longer knows of. The next fetch
    sees more entries than the consumer holds and gives the stale one back to its queue."""
    broker.publish(queue, encode_task("once", (1,), task_id="lost-ack"))
    consumer = broker.consumer([queue], 8)
    try:
        (delivery,) = fetch_until(consumer, 1, 5.0)
        ukey = consumer._parts[0].unacked
        saved = shared.hgetall(ukey)
        consumer.ack([delivery])
        assert shared.hlen(ukey) == 0
        shared.hset(ukey, mapping=saved)  # the state a failover restores: the ack never happened
        caplog.set_level(logging.WARNING, "millpond.broker.redis")
        assert consumer.fetch(8, 0.2) == []  # notices the stale entry
        (again,) = fetch_until(consumer, 1, 5.0)  # gives it back, then receives it again
        assert decode_task(again.message).task_id == "lost-ack"
        consumer.ack([again])
        assert shared.hlen(ukey) == 0 and shared.llen(queue) == 0
        assert "already acknowledged or given back" in caplog.text
    finally:
        consumer.close()


def test_blocked_consumer_wakes_for_a_delayed_message_published_meanwhile(
    broker: RedisBroker, queue: str
) -> None:
    consumer = broker.consumer([queue], 1)
    published: list[float] = []

    def later() -> None:
        published.append(time.time() + 0.5)
        broker.publish(queue, encode_task("soon", task_id="soon"), eta=published[0])

    timer = threading.Timer(0.2, later)
    try:
        timer.start()
        got = consumer.fetch(1, 10.0, Waker())
        arrived = time.time()
        assert [d.message.task_id for d in got] == ["soon"]
        assert published[0] - 0.05 <= arrived <= published[0] + 0.4, (
            f"a delayed message arrived {arrived - published[0]:+.3f} s from its eta"
        )
        consumer.ack(got)
    finally:
        timer.cancel()
        consumer.close()


def test_delays_live_in_redis_not_in_a_worker(queue: str, shared: redis.Redis) -> None:
    broker = RedisBroker(REDIS_URL, {**LEASE, "delays": "broker"})
    broker.publish(queue, encode_task("later"), eta=time.time() + 3600)
    broker.publish(queue, encode_task("past"), eta=time.time() - 10)  # due: queued at once
    assert broker.delayed_count(queue) == 1
    assert shared.zcard(f"millpond:delayed:{queue}") == 1
    assert broker.queue_length(queue) == 1
    with pytest.raises(PublishError, match="eta must be a finite number"):
        broker.publish(queue, encode_task("bad"), eta=float("nan"))
    broker.close()


def _where_it_waits(broker: RedisBroker, queue: str) -> tuple[int, int]:
    """(delayed in Redis, in the queue's list now) after one publish an hour ahead."""
    eta = time.time() + 3600
    broker.publish(queue, encode_task("later", task_id=unique("later"), eta=eta), eta=eta)
    return broker.delayed_count(queue), broker.queue_length(queue)


def test_with_delays_auto_a_delay_waits_in_redis_only_while_a_millpond_worker_serves_the_queue(
    queue: str, shared: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """No millpond consumer: the message goes out at once, eta in its headers, as Celery sends
    it (a Celery worker on the queue would hold it; nothing waits in a set no one releases).
    A millpond consumer in another process: it waits in Redis. After that consumer leaves (and
    the one-second memory of who serves expires): Celery-style again."""
    producer = RedisBroker(REDIS_URL, dict(LEASE))
    worker = RedisBroker(REDIS_URL, dict(LEASE))  # another process, as far as Redis can tell
    try:
        with caplog.at_level(logging.INFO, logger="millpond.broker.redis"):
            assert _where_it_waits(producer, queue) == (0, 1)
        assert "no millpond worker serves queue" in caplog.text
        # a message whose headers carry no eta would run at once if sent now: it waits here
        producer.publish(queue, encode_task("bare", task_id="bare"), eta=time.time() + 3600)
        assert producer.delayed_count(queue) == 1
        shared.delete(f"millpond:delayed:{queue}")
        raw = shared.lpop(queue)
        assert raw is not None
        assert decode_task(producer_message(raw)).eta is not None  # Celery reads it from here
        consumer = worker.consumer([queue], 1)
        producer._serving_seen.clear()  # what a second's wait would do
        try:
            assert _where_it_waits(producer, queue) == (1, 0)
        finally:
            consumer.close()
        producer._serving_seen.clear()
        assert _where_it_waits(producer, queue) == (1, 1)
    finally:
        producer.close()
        worker.close()


def producer_message(raw: bytes) -> Message:
    from millpond.wire import envelope

    return envelope.loads(raw)


def test_delays_celery_sends_eta_in_the_headers_but_a_worker_hands_back_to_redis(
    queue: str,
) -> None:
    """`delays = celery` publishes Celery-style even with millpond workers about; a worker's
    own hand-back (a message it received early) still waits in Redis, or it would come straight
    back to the worker that handed it back."""
    producer = RedisBroker(REDIS_URL, {**LEASE, "delays": "celery"})
    other = RedisBroker(REDIS_URL, dict(LEASE))
    consumer = other.consumer([queue], 1)
    try:
        assert _where_it_waits(producer, queue) == (0, 1)
        hand_back = RedisBroker(REDIS_URL, {**LEASE, "delays": "celery"})
        own = hand_back.consumer([queue], 1)
        try:
            assert _where_it_waits(hand_back, queue) == (1, 1)
        finally:
            own.close()
            hand_back.close()
    finally:
        consumer.close()
        other.close()
        producer.close()


def test_the_last_worker_of_a_queue_says_its_delays_wait_for_a_millpond_worker(
    queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker = RedisBroker(REDIS_URL, dict(LEASE))
    first, second = broker.consumer([queue], 1), broker.consumer([queue], 1)
    try:
        assert _where_it_waits(broker, queue) == (1, 0)
        with caplog.at_level(logging.WARNING, logger="millpond.broker.redis"):
            first.close()
            assert "wait in Redis" not in caplog.text  # another worker still serves the queue
            second.close()
        assert f"1 delayed message(s) of queue {queue!r} wait in Redis" in caplog.text
    finally:
        first.close()
        second.close()
        broker.close()


def test_idle_fetch_waits_without_polling(private_redis: RedisServer) -> None:
    url = f"redis://:{private_redis.password}@127.0.0.1:{private_redis.port}/0"
    broker = RedisBroker(url, {"heartbeat_interval": 30, "lease_timeout": 60})
    server = client_of(private_redis)
    consumer = broker.consumer([unique()], 1)
    try:
        consumer.fetch(1, 0.05)
        server.config_resetstat()
        start = time.monotonic()
        assert consumer.fetch(1, 1.0) == []
        assert time.monotonic() - start >= 0.95
        stats = server.info("commandstats")
        scripts = stats.get("cmdstat_evalsha", {}).get("calls", 0)
        # One script, then a blocking wait on the doorbell. When the server's blocking timeout
        # fires a few ms before the consumer's own deadline, the consumer checks once more
        # before returning (seen once in a loaded run): 2. Polling would be dozens.
        assert scripts in (1, 2), f"{scripts} fetch scripts ran during one idle 1 s fetch"
    finally:
        consumer.close()
        broker.close()


def test_lease_holds_while_the_loop_thread_runs_cpu_bound_work(
    broker: RedisBroker, queue: str, shared: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The solo pool runs a task inline in the loop thread: pure-Python work holding the GIL for
    over twice the lease must not let the lease lapse (another consumer's restorer is running)."""
    broker.publish(queue, encode_task("long", task_id="long"))
    holder = broker.consumer([queue], 1)
    rival = broker.consumer([queue], 1)
    try:
        held = fetch_until(holder, 1, 5.0)
        assert [d.message.task_id for d in held] == ["long"]
        end = time.monotonic() + 2.5 * LEASE["lease_timeout"]
        spins = 0
        while time.monotonic() < end:  # the "task": CPU-bound, no I/O, no sleep
            spins += sum(range(1000))
        assert shared.hlen(f"millpond:unacked:{holder.id}") == 1
        assert rival.fetch(1, 0.2) == [], "a message held by a busy, live consumer was redelivered"
        holder.ack(held)
        assert "no longer held" not in caplog.text
    finally:
        rival.close()
        holder.close()


# -- bad input -------------------------------------------------------------------------------------


def test_an_unreadable_entry_is_dead_lettered_with_its_bytes(
    broker: RedisBroker, queue: str, shared: redis.Redis
) -> None:
    shared.lpush(queue, b"\xffnot an envelope")
    broker.publish(queue, encode_task("fine", task_id="fine"))
    consumer = broker.consumer([queue], 4)
    try:
        got = drain(consumer, 1)
        assert [d.message.task_id for d in got] == ["fine"]
        dead = wait_for(lambda: broker.dead_letters(queue), 5.0, "dead-lettering")
        assert dead[0].body == b"\xffnot an envelope"
        assert "not a kombu JSON envelope" in dead[0].headers[DEATH_REASON]
        assert shared.hlen(f"millpond:unacked:{consumer.id}") == 0
    finally:
        consumer.close()


def test_bad_queue_names_and_messages_are_clear_errors(broker: RedisBroker) -> None:
    with pytest.raises(ConfigurationError, match="non-empty"):
        broker.publish("", encode_task("x"))
    with pytest.raises(ConfigurationError, match="separator"):
        broker.declare(["a\x06\x16b"])
    bad = Message(body=b"{}", headers={"id": "x", "when": object()})
    with pytest.raises(PublishError, match="JSON"):
        broker.publish(unique(), bad)


# -- restarts, failures, fork ----------------------------------------------------------------------


@pytest.mark.fault
@pytest.mark.slow
def test_consumer_and_producer_ride_through_a_redis_restart(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="millpond.broker.redis")
    url = f"redis://:{private_redis.password}@127.0.0.1:{private_redis.port}/0"
    options = {"heartbeat_interval": 0.2, "lease_timeout": 30, "socket_timeout": 2}
    broker = RedisBroker(url, options)
    queue = unique()
    try:
        for i in range(10):
            broker.publish(queue, encode_task("r", task_id=f"m{i}"))
        consumer = broker.consumer([queue], 10)
        held = fetch_until(consumer, 4, 5.0, max_count=4)
        assert len(held) == 4

        assert consumer.connected
        private_redis.kill()
        start = time.monotonic()
        assert consumer.fetch(4, 0.5) == []
        assert time.monotonic() - start < 3.0, "a fetch against a dead Redis blocked too long"
        assert not consumer.connected
        consumer.ack(held[:2])  # cannot reach Redis: kept and sent after the restart
        errors: list[BaseException] = []

        def publish_during_outage() -> None:
            try:
                broker.publish(queue, encode_task("r", task_id="during"))
            except BaseException as exc:
                errors.append(exc)

        producer = threading.Thread(target=publish_during_outage)
        producer.start()
        try:
            assert consumer.fetch(4, 0.2) == []
            private_redis.start()  # same port and dir: AOF brings every key back
        finally:
            producer.join(30)
        assert not errors, f"publish during the outage raised {errors[0]!r}"

        rest = fetch_until(consumer, 7, 15.0, max_count=10)
        assert consumer.connected
        ids = sorted(d.message.task_id for d in rest)
        assert ids == sorted([f"m{i}" for i in range(4, 10)] + ["during"])
        consumer.ack(rest)
        consumer.ack(held[2:])
        server = client_of(private_redis)
        assert wait_for(
            lambda: server.hlen(f"millpond:unacked:{consumer.id}") == 0, 5.0, "acks reaching Redis"
        )
        assert server.llen(queue) == 0
        consumer.close()
    finally:
        broker.close()
    text = caplog.text
    assert "fetch failed" in text or "reconnect failed" in text
    assert "is back" in text
    assert private_redis.password not in text, "the password leaked into the logs"


@pytest.mark.fault
def test_messages_reserved_by_a_fetch_whose_reply_was_lost_come_back(
    private_redis: RedisServer,
) -> None:
    proxy = ReplyCutter(private_redis.port)
    url = f"redis://:{private_redis.password}@127.0.0.1:{proxy.port}/0"
    broker = RedisBroker(url, {"heartbeat_interval": 30, "lease_timeout": 60})
    server = client_of(private_redis)
    queue = unique()
    try:
        consumer = broker.consumer([queue], 10)
        broker.publish(queue, encode_task("warm-up"))
        consumer.ack(consumer.fetch(1, 1.0))  # the fetch script is loaded: one EVALSHA next
        for i in range(3):
            broker.publish(queue, encode_task("lost", task_id=f"m{i}"))
        proxy.armed.set()
        assert consumer.fetch(3, 0.5) == []
        assert proxy.cut.is_set(), "the proxy did not cut the reply"
        assert server.llen(queue) == 0, "Redis should have run the fetch script"
        assert server.hlen(f"millpond:unacked:{consumer.id}") == 3
        got = fetch_until(consumer, 3, 5.0, max_count=3)
        assert sorted(d.message.task_id for d in got) == ["m0", "m1", "m2"]
        assert [d.delivery_count for d in got] == [1, 1, 1], "never-seen deliveries were counted"
        consumer.ack(got)
        assert server.hlen(f"millpond:unacked:{consumer.id}") == 0
        consumer.close()
    finally:
        broker.close()
        proxy.close()


@pytest.mark.fault
def test_a_refused_permission_is_raised_at_once_and_loses_nothing(
    private_redis: RedisServer,
) -> None:
    """NOPERM cannot clear up by itself: fetch raises AccessDenied at once (the worker stops on
    it, saying what to grant) instead of retrying for ever; nothing was reserved, so nothing is
    lost, and the consumer works again once the permission is back."""
    url = f"redis://:{private_redis.password}@127.0.0.1:{private_redis.port}/0"
    broker = RedisBroker(url, {"heartbeat_interval": 30, "lease_timeout": 60})
    server = client_of(private_redis)
    queue = unique()
    try:
        for i in range(3):
            broker.publish(queue, encode_task("oom", task_id=f"m{i}"))
        consumer = broker.consumer([queue], 10)
        server.execute_command("ACL", "SETUSER", "default", "-evalsha")  # refuse our scripts
        try:
            start = time.monotonic()
            with pytest.raises(AccessDenied, match="refused it to ACL user 'default'") as info:
                consumer.fetch(3, 0.3)
            assert time.monotonic() - start < 1.0
            assert "evalsha" in str(info.value) and "ACL SETUSER" in str(info.value)
            assert private_redis.password is not None
            assert private_redis.password not in str(info.value)
        finally:
            server.execute_command("ACL", "SETUSER", "default", "+evalsha")
        got = fetch_until(consumer, 3, 5.0, max_count=3)
        assert sorted(d.message.task_id for d in got) == ["m0", "m1", "m2"]
        assert [d.delivery_count for d in got] == [1, 1, 1]
        consumer.ack(got)
        consumer.close()
    finally:
        broker.close()


@pytest.mark.fault
def test_publish_gives_up_with_a_clear_error(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://:{private_redis.password}@127.0.0.1:{private_redis.port}/0"
    broker = RedisBroker(url, {"publish_retry_timeout": 0.5})
    try:
        broker.publish(unique(), encode_task("ok"))
        private_redis.kill()
        start = time.monotonic()
        with pytest.raises(PublishError) as info:
            broker.publish(unique(), encode_task("lost"))
        assert time.monotonic() - start < 3.0
        text = str(info.value)
        assert "did not answer" in text
        assert "publish_retry_timeout" in text
        assert private_redis.password not in text
        assert "***" in text
        assert private_redis.password not in caplog.text
    finally:
        broker.close()


def test_publish_and_results_work_after_fork(broker: RedisBroker, queue: str) -> None:
    backend = broker.default_backend()
    task_id = str(uuid.uuid4())
    broker.publish(queue, encode_task("f", task_id="parent-before"))
    pid = os.fork()
    if pid == 0:  # the child: inherited pools must not be shared with the parent
        code = 1
        try:
            broker.publish(queue, encode_task("f", task_id="child"))
            backend.store(
                ResultMeta(task_id=task_id, status=TaskState.SUCCESS, result="from child")
            )
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child failed"
    broker.publish(queue, encode_task("f", task_id="parent-after"))
    meta = backend.get(task_id, 5.0)
    assert meta is not None
    assert meta.result == "from child"
    backend.forget(task_id)
    backend.close()
    consumer = broker.consumer([queue], 8)
    try:
        got = drain(consumer, 3)
        assert {d.message.task_id for d in got} == {"parent-before", "child", "parent-after"}
    finally:
        consumer.close()


def test_results_expire_after_result_expires(private_redis: RedisServer) -> None:
    url = f"redis://:{private_redis.password}@127.0.0.1:{private_redis.port}/0"
    backend = RedisResultBackend(url, {"result_expires": 100})
    try:
        backend.store(ResultMeta(task_id="t-exp", status=TaskState.SUCCESS, result=1))
        ttl = client_of(private_redis).pttl("celery-task-meta-t-exp")
        assert 90_000 < ttl <= 100_000
    finally:
        backend.close()


def test_a_result_backend_with_a_wrong_password_fails_at_once(private_redis: RedisServer) -> None:
    """WRONGPASS is not retried for publish_retry_timeout nor called an unreachable server."""
    url = f"redis://:wrong-{private_redis.password}@127.0.0.1:{private_redis.port}/0"
    backend = RedisResultBackend(url, {"publish_retry_timeout": 60})
    try:
        start = time.monotonic()
        with pytest.raises(BackendError, match="refused the credentials") as info:
            backend.store(ResultMeta(task_id="t-denied", status=TaskState.SUCCESS, result=1))
        with pytest.raises(BackendError, match="refused the credentials"):
            backend.get("t-denied", 5.0)
        assert time.monotonic() - start < 2.0
        assert "did not answer" not in str(info.value)
        assert f"wrong-{private_redis.password}" not in str(info.value)
    finally:
        backend.close()


# -- TLS and sentinel, against private servers -----------------------------------------------------


def round_trip(broker: RedisBroker) -> None:
    """Publish, a consumer woken from its blocking wait, ack, and a result."""
    queue = unique()
    consumer = broker.consumer([queue], 1)
    timer = threading.Timer(0.2, lambda: broker.publish(queue, encode_task("rt", task_id="rt-1")))
    try:
        assert consumer.fetch(1, 0.1) == []
        timer.start()
        start = time.monotonic()
        got = consumer.fetch(1, 5.0, Waker())
        assert time.monotonic() - start < 1.0, "the blocked consumer woke late"
        assert [d.message.task_id for d in got] == ["rt-1"]
        consumer.ack(got)
    finally:
        timer.cancel()
        consumer.close()
    backend = broker.default_backend()
    try:
        backend.store(ResultMeta(task_id="rt-1", status=TaskState.SUCCESS, result=7))
        meta = backend.get("rt-1", 5.0)
        assert meta is not None
        assert meta.result == 7
    finally:
        backend.close()


@pytest.mark.slow
def test_tls_connection_with_a_private_ca(tmp_path: Path) -> None:
    ca, cert, key = make_certs(tmp_path / "certs")
    port = free_port()
    server = RedisServer(
        tmp_path / "tls",
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
        "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
    )  # fmt: skip
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"

    def ready() -> bool:
        try:
            return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    server.start(ready)
    try:
        broker = RedisBroker(url, dict(LEASE))
        try:
            round_trip(broker)
        finally:
            broker.close()
        untrusting = RedisBroker(f"rediss://127.0.0.1:{port}/0", {"publish_retry_timeout": 0})
        with pytest.raises(PublishError):  # the server's CA is not in the default trust store
            untrusting.publish(unique(), encode_task("x"))
        untrusting.close()
    finally:
        server.stop()


@pytest.mark.slow
def test_sentinel_finds_the_primary(tmp_path: Path) -> None:
    primary = RedisServer(tmp_path / "primary").start()
    sentinel_port = free_port()
    conf = tmp_path / "sentinel" / "sentinel.conf"
    conf.parent.mkdir()
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {conf.parent}\n"
        f"sentinel monitor mymaster 127.0.0.1 {primary.port} 1\n"
    )
    sentinel = subprocess.Popen(
        [str(REDIS_SERVER), str(conf), "--sentinel"], stdout=subprocess.DEVNULL
    )
    try:
        probe = redis.Redis(port=sentinel_port, socket_timeout=1)

        def knows_master() -> bool:
            try:
                return bool(
                    probe.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
                )
            except redis.RedisError:
                return False

        wait_for(knows_master, 10.0, "sentinel start-up")
        url = f"redis+sentinel://127.0.0.1:{sentinel_port}/0?master_name=mymaster"
        broker = RedisBroker(url, dict(LEASE))
        try:
            round_trip(broker)
        finally:
            broker.close()
        kombu_form = f"sentinel://127.0.0.1:{sentinel_port};sentinel://127.0.0.1:{sentinel_port}"
        broker = RedisBroker(kombu_form, {**LEASE, "master_name": "mymaster"})
        try:
            round_trip(broker)
        finally:
            broker.close()
    finally:
        sentinel.terminate()
        sentinel.wait(10)
        primary.stop()


# -- URLs, options, masking (no server needed) -----------------------------------------------------


def test_url_forms_parse() -> None:
    cfg = parse("redis://user:p%40ss@example.com:6380/3?lease_timeout=10&heartbeat_interval=1")
    assert (cfg.kind, cfg.hosts, cfg.db, cfg.username, cfg.password) == (
        "redis",
        (("example.com", 6380),),
        3,
        "user",
        "p@ss",
    )
    assert (cfg.lease_timeout, cfg.heartbeat_interval) == (10.0, 1.0)
    assert parse("redis://").hosts == (("localhost", 6379),)
    assert parse("redis://[::1]:7000").hosts == (("::1", 7000),)

    tls = parse(
        "rediss://h:6390/0?ssl_cert_reqs=optional&ssl_ca_certs=/etc/ca.pem",
        {"ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem", "ssl_cert_reqs": "none"},
    )
    assert (tls.kind, tls.ssl_cert_reqs, tls.ssl_ca_certs, tls.ssl_certfile, tls.ssl_keyfile) == (
        "rediss",
        "none",  # options win over the URL
        "/etc/ca.pem",
        "/c.pem",
        "/k.pem",
    )

    s = parse("redis+sentinel://:pw@s1:26379,[::1],s3:26380/2?master_name=mymaster")
    assert (s.kind, s.hosts, s.db, s.master_name, s.password) == (
        "sentinel",
        (("s1", 26379), ("::1", 26379), ("s3", 26380)),
        2,
        "mymaster",
        "pw",
    )
    k = parse("sentinel://:pw@s1:26379;sentinel://:pw@s2:26379/1", {"master_name": "m"})
    assert (k.kind, k.hosts, k.db, k.password) == (
        "sentinel",
        (("s1", 26379), ("s2", 26379)),
        1,
        "pw",
    )
    assert parse("redis://h", {"priority_steps": "0,5"}).steps == (0, 5)
    assert parse(REDIS_URL).lease_timeout <= 60, "the default lease must be at most 60 s"


@pytest.mark.parametrize(
    ("url", "options", "match"),
    [
        (
            "redis://h/0?lease_timout=3",
            {},
            r"unknown setting 'redis\.lease_timout' \(in the query of redis://h/0\?lease_timout=3\)"
            r" \(did you mean 'lease_timeout'\?\)",
        ),
        ("redis://h/0", {"lease_timout": 3}, r"'redis\.lease_timout' \(options\)"),
        ("redis://h/0", {"visibility_timeout": 3600}, "lease_timeout"),
        # kombu's separator and fanout options: dropping them as a "typo" would leave Celery's
        # priority lists (`q:3` with sep=':') unread, so the refusal says what they mean here
        ("redis://h/0", {"sep": ":"}, r"'redis\.sep' .*not supported.*\\x06\\x16"),
        ("redis://h/0?fanout_prefix=true", {}, r"'redis\.fanout_prefix' .*not supported"),
        ("redis://h/0", {"fanout_patterns": True}, r"'redis\.fanout_patterns' .*not supported"),
        ("redis://h:notaport/0", {}, "port 'notaport' is not a number"),
        ("redis://h/zero", {}, "database number"),
        ("redis://h/0", {"lease_timeout": 1, "heartbeat_interval": 1}, "at least twice"),
        ("redis://h/0", {"lease_timeout": "soon"}, "not a number"),
        ("redis+sentinel://s1,s2/0", {}, "master_name"),
        ("redis://h/0", {"ssl_ca_certs": "/ca.pem"}, "rediss://"),
        ("redis://h1,h2/0", {}, "several hosts"),
        ("http://h/0", {}, "not served by millpond-broker-redis"),
        ("redis://h/0", {"ssl_cert_reqs": "maybe"}, "one of 'required', 'optional', 'none'"),
        ("redis://h/0?ssl_check_hostname=maybe", {}, "not a boolean"),
        ("redis://h/0?max_connections=0", {}, "too small"),
        ("redis://h/0", {"priority_steps": [3, 6]}, "start at 0"),
        ("localhost:6379", {}, "not a URL"),
    ],
)
def test_bad_urls_and_options_are_clear_errors(
    url: str, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        parse(url, options)


def test_passwords_never_show() -> None:
    urls = [
        "redis://:hunter2@h:6379/0",
        "rediss://user:hunter2@h/0",
        "redis+sentinel://:hunter2@s1:26379,s2:26379/0?master_name=m",
        "sentinel://:hunter2@s1:26379;sentinel://:hunter2@s2:26379",
    ]
    for url in urls:
        assert "hunter2" not in mask(url), mask(url)
        assert "hunter2" not in mask_url(url.split(";")[0]), mask_url(url)
    # an unescaped `@` inside the password: the host is after the last one (as redis-py reads it)
    assert mask("redis://:hun@ter2@h:6379/0") == "redis://:***@h:6379/0"
    options = {"master_name": "m", "sentinel_password": "hunter2"}
    cfg = parse(urls[2], options)
    assert "hunter2" not in repr(cfg)
    broker = RedisBroker(urls[2], options)
    assert "hunter2" not in repr(broker)
    with pytest.raises(ConfigurationError) as info:
        parse("redis://:hunter2@h:bad/0")
    assert "hunter2" not in str(info.value)
    broker.close()


def test_entry_points_name_the_plugin() -> None:
    from importlib.metadata import entry_points

    brokers = {ep.name: ep.value for ep in entry_points(group="millpond.brokers")}
    backends = {ep.name: ep.value for ep in entry_points(group="millpond.backends")}
    for scheme in ("redis", "rediss", "redis+sentinel"):
        assert brokers[scheme] == "millpond_broker_redis:RedisBroker"
    for scheme in ("redis", "rediss"):
        assert backends[scheme] == "millpond_broker_redis:RedisResultBackend"


def test_the_settings_section_feeds_the_parser() -> None:
    """The core hands the broker its [redis] values, the URL's query weighed in; every declared
    option reaches RedisConfig, and the section's defaults are the parser's."""
    from dataclasses import fields

    from millpond.config.settings import load_settings
    from millpond_broker_redis.config import RedisConfig
    from millpond_broker_redis.settings import SECTION

    assert {o.name for o in SECTION.options} <= {f.name for f in fields(RedisConfig)}
    env = {
        "MILLPOND_BROKER_URL": f"{REDIS_URL}?socket_timeout=3",
        "MILLPOND_REDIS__LEASE_TIMEOUT": "10",
        "MILLPOND_REDIS__PRIORITY_STEPS": "0,9",
    }
    settings = load_settings({}, env=env)
    for scheme in ("redis", "rediss", "redis+sentinel"):  # one section, found by each scheme
        assert settings.plugin_options(scheme) == settings.plugin_options("redis")
    options = settings.plugin_options("redis", "broker_url")
    cfg = parse(settings.broker_url or "", options)
    assert (cfg.lease_timeout, cfg.steps, cfg.socket_timeout) == (10.0, (0, 9), 3.0)
    defaults = load_settings({}, env={}).plugin_options("redis")
    assert parse(REDIS_URL, defaults) == parse(REDIS_URL), "section defaults drifted"


def test_a_result_stored_in_another_database_does_not_answer_a_waiter() -> None:
    """Redis pub/sub ignores the database number: a waiter must read its own database."""
    import threading
    import uuid

    from millpond.contracts.backend import ResultMeta
    from millpond_broker_redis import RedisResultBackend

    mine = RedisResultBackend("redis://127.0.0.1:6379/14")
    other = RedisResultBackend("redis://127.0.0.1:6379/15")
    task_id = str(uuid.uuid4())
    try:
        timer = threading.Timer(
            0.2, lambda: other.store(ResultMeta(task_id, TaskState.SUCCESS, result="theirs"))
        )
        timer.start()
        assert (
            mine.get(task_id, timeout=1.0) is None
        )  # woken by db 15's publish, but db 14 is empty
        timer.join()
        mine.store(ResultMeta(task_id, TaskState.SUCCESS, result="mine"))
        got = mine.get(task_id, timeout=1.0)
        assert got is not None
        assert got.result == "mine"
    finally:
        mine.forget(task_id)
        other.forget(task_id)
        mine.close()
        other.close()


def test_a_worker_on_a_redis_without_persistence_is_warned_once(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="millpond.broker.redis")

    def warnings_for(url: str, **options: Any) -> list[str]:
        caplog.clear()
        b = RedisBroker(url, options)
        try:
            for _ in range(2):  # a second consumer of the same broker does not repeat it
                b.consumer([f"persist-{uuid.uuid4().hex[:8]}"], 1).close()
        finally:
            b.close()
        return [r.getMessage() for r in caplog.records if "no append-only file" in r.getMessage()]

    # the private server keeps an append-only file: nothing to say
    url = f"redis://:{private_redis.password}@127.0.0.1:{private_redis.port}/0"
    assert warnings_for(url) == []
    client_of(private_redis).config_set("appendonly", "no")
    client_of(private_redis).config_set("save", "")
    said = warnings_for(url)
    assert len(said) == 1, said
    assert "every queued and delayed task is lost" in said[0]
    assert "redis.warn_without_persistence = false" in said[0]
    assert warnings_for(url, warn_without_persistence=False) == []
