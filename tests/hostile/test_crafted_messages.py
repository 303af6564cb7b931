"""Hostile messages written straight into the queues (LPUSH of raw entries into the Redis list,
`basic_publish` with raw properties on RabbitMQ), between well-formed tasks, to a real prefork
worker: each is dead-lettered with a reason and a log line; the worker neither crashes nor hangs,
and every task around them runs."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import amqp
import pytest
import redis

from millpond.testing.harness import wait_until
from millpond.wire import envelope
from millpond.wire.protocol import DEATH_REASON, Message
from tests.faults.harness import SINK, Rig
from tests.hostile.crafted import MAX_SIZE, Case, for_broker, marker_path

pytestmark = [pytest.mark.e2e]


def push_redis(rig: Rig, raw: bytes) -> None:
    client = redis.Redis.from_url(rig.broker_url)
    try:
        client.lpush(rig.queue, raw)
    finally:
        client.close()


class RawAmqp:
    """A bare py-amqp channel: publishes exactly the properties it is given."""

    def __init__(self) -> None:
        self.conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
        self.conn.connect()
        self.chan = self.conn.channel()

    def publish(self, queue: str, message: Message) -> None:
        props: dict[str, Any] = {
            "content_type": message.content_type,
            "content_encoding": message.content_encoding,
            "application_headers": message.headers,
            "delivery_mode": 2,
        }
        props.update(message.properties)
        self.chan.basic_publish(amqp.Message(message.body, **props), exchange="", routing_key=queue)

    def close(self) -> None:
        self.conn.close()


def identify(dead: Message, cases: dict[str, Case], raws: dict[bytes, Case]) -> Case:
    key = dead.properties.get("correlation_id")
    if isinstance(key, str) and key in cases:
        return cases[key]
    if dead.body in raws:
        return raws[dead.body]
    raise AssertionError(f"a dead letter matches no case: {dead.headers!r:.300}")


@pytest.mark.parametrize("broker", [pytest.param("redis", marks=pytest.mark.redis),
                                    pytest.param("amqp", marks=pytest.mark.amqp)])  # fmt: skip
def test_hostile_messages_are_dead_lettered_and_the_worker_goes_on(
    make_rig: Callable[..., Rig], broker: str, tmp_path: Path
) -> None:
    rig = make_rig(broker, MILLPOND_MAX_MESSAGE_SIZE=str(MAX_SIZE))
    worker = rig.spawn("prefork", 2).wait_ready()
    alive = rig.alive(worker)
    catalogue = for_broker(broker)
    by_id: dict[str, Case] = {}
    by_raw: dict[bytes, Case] = {}
    runs: list[str] = []
    fails: dict[str, Case] = {}
    good: list[str] = []
    raw_amqp = RawAmqp() if broker == "amqp" else None
    try:
        for case in catalogue:
            if case.raw is not None:
                raw = case.raw(rig.directory)
                by_raw[raw] = case
                push_redis(rig, raw)
            else:
                assert case.build is not None
                message = case.build(case.name, rig.directory)
                task_id = message.properties["correlation_id"]
                by_id[task_id] = case
                if case.outcome == "runs":
                    runs.append(task_id)
                elif case.outcome == "fails":
                    fails[task_id] = case
                if raw_amqp is not None:
                    raw_amqp.publish(rig.queue, message)
                else:
                    push_redis(rig, envelope.dumps(message, queue=rig.queue).encode())
            good += rig.publish(1, SINK, (len(good),))  # a well-formed task after each
    finally:
        if raw_amqp is not None:
            raw_amqp.close()
    rig.ledger.wait_for(good + runs, 60, alive=alive)
    expected = [c for c in catalogue if c.outcome == "dead"]
    dead = wait_until(
        lambda: len(d := rig.dead_letters()) >= len(expected) and d,
        30,
        f"{len(expected)} dead letters",
    )
    reasons: dict[str, str] = {}
    for message in dead:
        case = identify(message, by_id, by_raw)
        assert case.name not in reasons, f"{case.name} was dead-lettered twice"
        reasons[case.name] = str(message.headers.get(DEATH_REASON))
    width = max(len(c.name) for c in expected)
    for case in expected:
        print(f"  {case.name:{width}}  ->  {reasons.get(case.name, '(not dead-lettered)')[:110]}")
    assert set(reasons) == {c.name for c in expected}
    wrong = {c.name: reasons[c.name] for c in expected if c.reason not in reasons[c.name]}
    assert not wrong, f"unexpected reasons: {wrong}"
    assert not marker_path(rig.directory).exists(), "unpickling ran code from a message"
    # one log line per rejection, each with the reason
    lines = worker.lines()
    rejected = [
        line for line in lines if line.get("event") == "message rejected to the dead-letter queue"
    ]
    unreadable = [line for line in lines if "is unreadable" in str(line.get("event"))]
    assert len(rejected) + len(unreadable) == len(expected), (len(rejected), len(unreadable))
    assert all(line.get("reason") for line in rejected)
    assert not [
        line for line in lines if "unexpected error while decoding" in str(line.get("event"))
    ]
    failed = {
        str(line.get("task_id")): str(line.get("error"))
        for line in lines
        if line.get("event") == "task failed"
    }
    for task_id, case in fails.items():
        print(f"  {case.name:{width}}  ->  task failed: {failed.get(task_id, '(no)')[:110]}")
        assert case.reason in failed.get(task_id, ""), f"{case.name}: {failed.get(task_id)}"
    report = rig.ledger.report(
        f"tasks around {len(expected)} hostile messages on {broker}", good + runs
    )
    assert not report.missing
    rig.assert_no_duplicates(report)
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.text()[-3000:]
