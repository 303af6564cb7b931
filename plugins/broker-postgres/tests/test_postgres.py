"""Postgres broker: what the kit does not cover.

Configuration errors and masking; `publish_many` as one all-or-nothing statement; a delayed
message waking a consumer that is already waiting; the priority warning; result expiry and
groups; publishing after fork; a role that may not create the tables; a plain SQL INSERT from
another program waking a consumer (the trigger); and a worker riding through a PostgreSQL
SIGKILL and restart (a private server of the test's own) without losing or repeating a task.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tests.faults.harness import NAP, Rig, kill_tree

from millpond.contracts.backend import ResultMeta
from millpond.contracts.broker import Outbound, dead_letter_queue
from millpond.exceptions import ConfigurationError, PublishError
from millpond.states import TaskState
from millpond.testing.broker_kit import fetch_until, sample_message
from millpond.testing.harness import WorkerProcess, wait_until
from millpond.testing.servers import PostgresServer
from millpond.wire.protocol import Message, encode_task
from millpond_broker_postgres import PostgresBroker, PostgresResultBackend, parse

LEASE = {"lease_timeout": 1.0, "heartbeat_interval": 0.2}


def unique(prefix: str = "pg-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def broker(postgres_url: str) -> Iterator[PostgresBroker]:
    b = PostgresBroker(postgres_url, dict(LEASE))
    b.connect()
    yield b
    b.close()


@pytest.fixture
def queue(broker: PostgresBroker) -> Iterator[str]:
    name = unique()
    broker.declare([name])
    yield name
    broker.purge(name)
    broker.purge(dead_letter_queue(name))


# -- configuration --------------------------------------------------------------------------------


def test_url_options_and_libpq_parameters_are_parsed_and_the_password_masked() -> None:
    cfg = parse(
        "postgresql://app:pa55word@db.example:6543/jobs?lease_timeout=10&sslmode=require"
        "&application_name=billing&schema=queues"
    )
    assert (cfg.lease_timeout, cfg.schema) == (10.0, "queues")
    assert cfg.conninfo == "postgresql://app:pa55word@db.example:6543/jobs"
    kwargs = cfg.connect_kwargs()
    assert kwargs["sslmode"] == "require"
    assert kwargs["application_name"] == "billing"
    assert "pa55word" not in repr(cfg)
    assert "pa55word" not in cfg.masked_url


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("postgresql://h/db?visibility_timeout=5", {}, "per-consumer leases"),
        ("postgresql://h/db?lease_timout=5", {}, "lease_timeout"),
        ("postgresql://h/db", {"schema": "Bad-Name"}, "lower-case identifier"),
        ("postgresql://h/db", {"lease_timeout": 1, "heartbeat_interval": 1}, "at least twice"),
        ("postgresql://h/db?sslmode=sometimes", {}, "verify-full"),
        ("mysql://h/db", {}, "postgresql://"),
    ],
)
def test_bad_configuration_is_refused_with_what_to_do(
    url: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse(url, options)


def test_a_role_that_may_not_create_the_tables_gets_a_clear_error(
    postgres_server: PostgresServer,
) -> None:
    role, password = f"limited_{uuid.uuid4().hex[:8]}", "limited-pw"
    with psycopg.connect(postgres_server.url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        admin.execute(f"REVOKE CREATE ON DATABASE {postgres_server.database} FROM {role}")
    url = postgres_server.url.replace(
        f"{postgres_server.user}:{postgres_server.password}", f"{role}:{password}"
    )
    broker = PostgresBroker(url, {"schema": f"s_{uuid.uuid4().hex[:8]}"})
    try:
        with pytest.raises(ConfigurationError, match="cannot create millpond's tables"):
            broker.connect()
    finally:
        broker.close()


# -- producing ------------------------------------------------------------------------------------


def test_publish_many_is_one_statement_all_or_nothing(broker: PostgresBroker, queue: str) -> None:
    good = [Outbound(queue, sample_message(f"ok-{i}")) for i in range(10)]
    # a NUL in a text column is refused by the server, after the Python side has accepted it
    bad = Message(body=b"x", headers={"id": "bad"}, content_type="text/\x00plain")
    with pytest.raises(PublishError):
        broker.publish_many([*good, Outbound(queue, bad)])
    assert broker.queue_length(queue) == 0, "part of a failed batch was stored"
    broker.publish_many(good)
    assert broker.queue_length(queue) == 10


def test_a_priority_is_warned_about_once(
    broker: PostgresBroker, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    message = sample_message()
    message.properties["priority"] = 7
    with caplog.at_level(logging.WARNING, logger="millpond.broker.postgres"):
        broker.publish(queue, message)
        broker.publish(queue, message)
    said = [r for r in caplog.records if "ignores priorities" in r.getMessage()]
    assert len(said) == 1


def test_publish_after_fork_leaves_the_parents_connection_working(
    broker: PostgresBroker, queue: str
) -> None:
    broker.publish(queue, sample_message("parent-before"))
    pid = os.fork()
    if pid == 0:  # the child: publish on its own connection, then leave without cleanup
        code = 0
        try:
            broker.publish(queue, sample_message("from-child"))
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "publishing in a forked child failed"
    broker.publish(queue, sample_message("parent-after"))  # the inherited connection still works
    assert broker.queue_length(queue) == 3


def test_a_forked_child_dropping_its_copies_leaves_the_parents_sessions_alone(
    broker: PostgresBroker, queue: str
) -> None:
    """A prefork child that garbage-collects what it inherited (the app reset after fork) must
    not end the parent's sessions: libpq's goodbye on an inherited socket would."""
    import gc

    consumer = broker.consumer([queue], 1)
    try:
        broker.publish(queue, sample_message("before"))
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                consumer._conn = None  # drop the copies, finalising them
                consumer._beat_conn = None
                broker.store.pool._idle.clear()
                gc.collect()
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        got = consumer.fetch(1, 5.0)
        assert [d.message.task_id for d in got] == ["before"]
        assert consumer.connected, "the parent's consumer connection was ended by the child"
        consumer.ack(got)
        broker.publish(queue, sample_message("after"))  # the producer's pooled connection too
    finally:
        consumer.close()


# -- consuming ------------------------------------------------------------------------------------


def test_a_delayed_message_wakes_a_consumer_that_is_already_waiting(
    broker: PostgresBroker, queue: str
) -> None:
    consumer = broker.consumer([queue], 1)
    try:
        eta = time.time() + 0.5
        timer = threading.Timer(0.1, lambda: broker.publish(queue, sample_message("soon"), eta=eta))
        timer.start()
        got = consumer.fetch(1, 8.0)
        arrived = time.time()
        timer.join(5)
        assert [d.message.task_id for d in got] == ["soon"]
        assert arrived >= eta - 0.05, "delivered before its eta"
        assert arrived - eta < 0.5, f"delivered {arrived - eta:.2f} s after its eta"
        assert broker.delayed_count(queue) == 0
        consumer.ack(got)
    finally:
        consumer.close()


def test_a_plain_sql_insert_wakes_a_waiting_consumer(
    broker: PostgresBroker, queue: str, postgres_url: str
) -> None:
    """The trigger notifies, not the Python producer: another program may enqueue with SQL (in
    its own transaction, so the task exists exactly when the data it refers to does)."""
    consumer = broker.consumer([queue], 1)
    message = encode_task("kit.add", (1, 2))

    def insert() -> None:
        with psycopg.connect(postgres_url) as conn:  # a transaction, committed on exit
            conn.execute(
                "INSERT INTO millpond.messages (queue, body, headers, properties, content_type,"
                " content_encoding) VALUES (%s, %s, %s::jsonb, '{}'::jsonb, %s, %s)",
                [
                    queue,
                    message.body,
                    psycopg.types.json.Jsonb(message.headers),
                    message.content_type,
                    message.content_encoding,
                ],
            )

    try:
        timer = threading.Timer(0.2, insert)
        start = time.monotonic()
        timer.start()
        got = consumer.fetch(1, 8.0)
        waited = time.monotonic() - start
        timer.join(5)
        assert [d.message.task_id for d in got] == [message.task_id]
        assert waited < 1.5, f"the consumer noticed the INSERT only after {waited:.2f} s"
        consumer.ack(got)
    finally:
        consumer.close()


def test_a_reserved_message_is_invisible_to_other_consumers_until_given_back(
    broker: PostgresBroker, queue: str
) -> None:
    for i in range(3):
        broker.publish(queue, sample_message(f"m{i}"))
    first, second = broker.consumer([queue], 2), broker.consumer([queue], 5)
    try:
        held = fetch_until(first, 2, 5.0)
        rest = fetch_until(second, 3, 1.0)
        assert [d.message.task_id for d in rest] == ["m2"]
        first.reject(held[0], requeue=True)
        back = fetch_until(second, 1, 5.0)
        assert [d.message.task_id for d in back] == [held[0].message.task_id]
        assert back[0].delivery_count == 2
        first.ack(held[1:])
        second.ack(rest + back)
    finally:
        first.close()
        second.close()


# -- results ----------------------------------------------------------------------------------------


def test_results_expire(postgres_url: str) -> None:
    backend = PostgresResultBackend(postgres_url, {"result_expires": 0.5})
    task_id = str(uuid.uuid4())
    try:
        backend.store(ResultMeta(task_id=task_id, status=TaskState.SUCCESS, result=1))
        assert backend.peek(task_id) is not None
        wait_until(lambda: backend.peek(task_id) is None, 5, "the result to expire")
        assert backend.get(task_id, 0.1) is None
    finally:
        backend.forget(task_id)
        backend.close()


def test_groups_are_saved_and_restored(postgres_url: str) -> None:
    backend = PostgresResultBackend(postgres_url)
    group_id = str(uuid.uuid4())
    value = [[["a", None], None], [["b", None], None]]
    try:
        backend.save_group(group_id, value)
        assert backend.restore_group(group_id) == value
        backend.forget_group(group_id)
        assert backend.restore_group(group_id) is None
    finally:
        backend.close()


# -- a PostgreSQL restart -------------------------------------------------------------------------


def _events(worker: WorkerProcess, needle: str) -> int:
    return sum(1 for line in worker.lines() if needle in str(line.get("event", "")))


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.e2e
@pytest.mark.fault
def test_worker_rides_through_a_postgres_restart(
    private_postgres: PostgresServer, tmp_path: Path
) -> None:
    rig = Rig(tmp_path, private_postgres.url, {"MILLPOND_POSTGRES__LEASE_TIMEOUT": "15"})
    try:
        ids = rig.load(2000, NAP, (0.002,))
        worker = rig.spawn("threads", 4).wait_ready()
        alive = rig.alive(worker)
        rig.ledger.wait_progress(400, 30, alive=alive)
        private_postgres.kill()  # SIGKILL the postmaster: crash recovery on the next start
        wait_until(lambda: _events(worker, "failed") > 0, 15, "the worker to log the outage")
        stalled_at = rig.ledger.progress()
        private_postgres.launch()  # same port, same data directory
        rig.ledger.wait_for(ids, 60, alive=alive)
        report = rig.ledger.report(f"PostgreSQL SIGKILLed and restarted at {stalled_at}", ids)
        assert not report.missing
        # the outage was shorter than lease_timeout and kept acks were sent afterwards
        assert not report.duplicates, report
        assert _events(worker, "is back") >= 1
        assert private_postgres.password not in worker.text(), "the password leaked"
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.text()[-3000:]
    finally:
        for w in rig.workers:
            kill_tree(w.pid)
        rig.close()


# -- chords -----------------------------------------------------------------------------------------


def test_a_chord_join_completes_once_in_header_order(postgres_url: str) -> None:
    backend = PostgresResultBackend(postgres_url)
    group_id = str(uuid.uuid4())
    try:
        backend.set_chord_size(group_id, 3)
        assert backend.chord_part_return(group_id, "t2", 2, "SUCCESS", 20) is None
        assert backend.chord_part_return(group_id, "t0", 0, "SUCCESS", 0) is None
        assert backend.chord_part_return(group_id, "t0", 0, "SUCCESS", 99) is None  # a copy
        error = {"exc_type": "ValueError", "exc_message": ["x"], "exc_module": "builtins"}
        parts = backend.chord_part_return(group_id, "t1", 1, "FAILURE", error)
        assert parts == [("t0", "SUCCESS", 0), ("t1", "FAILURE", error), ("t2", "SUCCESS", 20)]
        # claimed: a redelivered part does not complete it again while the claim lives
        assert backend.chord_part_return(group_id, "t1", 1, "FAILURE", error) is None
        expires = backend.chord_claim_expires(group_id)
        assert expires is not None and expires > time.time()
        backend.chord_release(group_id)  # the claimant could not send the body
        assert backend.chord_claim_expires(group_id) is None
        again = backend.chord_part_return(group_id, "t1", 1, "FAILURE", error)
        assert again is not None and len(again) == 3
        backend.chord_done(group_id)
        assert backend.chord_part_return(group_id, "t2", 2, "SUCCESS", 20) is None
        assert backend.chord_claim_expires(group_id) is None
    finally:
        backend.close()


def test_concurrent_returns_complete_a_chord_exactly_once(postgres_url: str) -> None:
    backend = PostgresResultBackend(postgres_url)
    group_id = str(uuid.uuid4())
    size = 40
    winners: list[list[Any]] = []
    lock = threading.Lock()
    try:
        backend.set_chord_size(group_id, size)
        start = threading.Barrier(8)

        def returner(offset: int) -> None:
            start.wait(10)
            for i in range(offset, size, 8):
                got = backend.chord_part_return(group_id, f"t{i}", i, "SUCCESS", i)
                if got is not None:
                    with lock:
                        winners.append(got)

        threads = [threading.Thread(target=returner, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(winners) == 1, f"{len(winners)} callers completed the chord"
        assert [value for _, _, value in winners[0]] == list(range(size))
    finally:
        backend.close()
