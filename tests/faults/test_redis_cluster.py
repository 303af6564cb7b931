"""`millpond worker` subprocesses on a private Redis Cluster (`redis-cluster://`): three queues on
three primaries served by one worker, and a primary's failover under load.

The cluster is `millpond.testing.servers.RedisClusterGroup`: three primaries (and, for the failover,
a replica of each) on free loopback ports. A queue's keys live in the slot of its name (its hash
tag), so the tests pick names whose slots three different primaries serve and check that each
primary itself holds its queue's list.

A primary killed with SIGKILL loses what its replica had not received yet (Redis replicates
asynchronously): that test allows missing tasks only among those the killed primary's queue took
in the second before the kill, and fails on any other.

A graceful `CLUSTER FAILOVER` makes the old primary stop taking writes until its replica has
everything, so nothing it acknowledged is lost: that test fails on any missing task. Duplicates (a
fetch or an ack whose reply was lost in the switch) are counted and allowed: at-least-once.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from millpond.testing.harness import wait_until
from millpond.testing.servers import RedisClusterGroup, resp
from millpond.wire.protocol import encode_task
from tests.faults.harness import NOOP, Rig

pytestmark = [pytest.mark.fault, pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterGroup]:
    group = RedisClusterGroup(tmp_path / "cluster").start()
    try:
        yield group
    finally:
        group.stop()


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[RedisClusterGroup]:
    group = RedisClusterGroup(tmp_path / "cluster", replicas=1).start()
    try:
        yield group
    finally:
        group.stop()


def _rig(make_rig: Callable[..., Rig], group: RedisClusterGroup, queues: list[str]) -> Rig:
    return make_rig(
        "redis",
        url=group.url(),
        MILLPOND_QUEUES=",".join(queues),
        MILLPOND_REDIS__LEASE_TIMEOUT="5",
        MILLPOND_REDIS__WARN_WITHOUT_PERSISTENCE="false",
    )


def test_one_worker_serves_three_queues_on_three_primaries(
    make_rig: Callable[..., Rig], cluster: RedisClusterGroup
) -> None:
    queues = cluster.names_on_distinct_primaries("e2e")
    owners = {q: cluster.slot_owner(cluster.keyslot(q)) for q in queues}
    assert len(set(owners.values())) == 3
    rig = _rig(make_rig, cluster, queues)
    ids: dict[str, list[str]] = {q: [str(uuid.uuid4()) for _ in range(200)] for q in queues}
    for queue, some in ids.items():
        for task_id in some:
            rig.broker.publish(queue, encode_task(NOOP, (), task_id=task_id))
    for queue in queues:  # the primary serving the queue's slot holds its list itself
        assert resp(owners[queue], "LLEN", "{" + queue + "}") == 200
    worker = rig.spawn("threads", 4).wait_ready()
    every = [i for some in ids.values() for i in some]
    rig.ledger.wait_for(every, 60, alive=rig.alive(worker))
    report = rig.ledger.report("three queues on three primaries", every)
    assert not report.missing and not report.extra, report
    rig.assert_no_duplicates(report)
    for queue in queues:
        assert resp(owners[queue], "LLEN", "{" + queue + "}") == 0


TASKS = 5000
BATCH, PAUSE = 50, 0.01


@dataclass
class Producer:
    """Publishes `TASKS` no-ops round-robin over the queues in a thread."""

    rig: Rig
    queues: list[str]
    ids: list[str] = field(default_factory=list)
    #: task id -> (queue, when its publish was sent, when it returned)
    sent: dict[str, tuple[str, float, float]] = field(default_factory=dict)
    error: BaseException | None = None

    def run(self) -> None:
        try:
            n = 0
            while len(self.ids) < TASKS:
                for _ in range(BATCH):
                    task_id = str(uuid.uuid4())
                    queue = self.queues[n % len(self.queues)]
                    at = time.monotonic()
                    self.rig.broker.publish(queue, encode_task(NOOP, (), task_id=task_id))
                    self.sent[task_id] = (queue, at, time.monotonic())
                    self.ids.append(task_id)
                    n += 1
                time.sleep(PAUSE)  # pacing the load, not synchronising
        except BaseException as exc:  # reported by the test
            self.error = exc

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="cluster-producer", daemon=True)
        thread.start()
        return thread


def test_cluster_failover_under_load_loses_nothing(
    make_rig: Callable[..., Rig], replicated: RedisClusterGroup
) -> None:
    group = replicated
    queues = group.names_on_distinct_primaries("failover")
    rig = _rig(make_rig, group, queues)
    workers = [rig.spawn("threads", 4).wait_ready(), rig.spawn("threads", 4).wait_ready()]
    alive = rig.alive(*workers)
    producer = Producer(rig, queues)
    thread = producer.start()
    wait_until(lambda: len(producer.ids) >= TASKS * 0.3, 60, "the producer to send 30%")
    rig.ledger.wait_progress(200, 60, alive=alive)
    old = group.slot_owner(group.keyslot(queues[0]))
    started = time.monotonic()
    new = group.failover(old)
    took = time.monotonic() - started
    assert group.slot_owner(group.keyslot(queues[0])) == new != old
    thread.join(120)
    assert not thread.is_alive(), "the producer did not finish within 120 s"
    assert producer.error is None, f"the producer failed: {producer.error!r}"
    rig.ledger.wait_for(producer.ids, 120, alive=alive)
    report = rig.ledger.report("CLUSTER FAILOVER under load", producer.ids)
    duplicates = sum(n - 1 for n in report.duplicates.values())
    print(
        f"[CLUSTER FAILOVER under load] failover took {took:.2f} s; lost "
        f"{len(report.missing)}; {duplicates} duplicate runs"
    )
    assert not report.missing and not report.extra, report
    for worker in workers:  # the workers followed the new primary: they are serving it
        assert worker.proc.poll() is None
    follow = [str(uuid.uuid4()) for _ in range(30)]
    for n, task_id in enumerate(follow):
        rig.broker.publish(queues[n % 3], encode_task(NOOP, (), task_id=task_id))
    rig.ledger.wait_for(follow, 30, alive=alive)


def test_cluster_primary_sigkilled_under_load(
    make_rig: Callable[..., Rig], replicated: RedisClusterGroup
) -> None:
    group = replicated
    queues = group.names_on_distinct_primaries("sigkill")
    rig = _rig(make_rig, group, queues)
    workers = [rig.spawn("threads", 4).wait_ready(), rig.spawn("threads", 4).wait_ready()]
    alive = rig.alive(*workers)
    producer = Producer(rig, queues)
    thread = producer.start()
    wait_until(lambda: len(producer.ids) >= TASKS * 0.3, 60, "the producer to send 30%")
    rig.ledger.wait_progress(200, 60, alive=alive)
    old = group.slot_owner(group.keyslot(queues[0]))
    replica = group.replica_of(old)
    killed_at = time.monotonic()
    group.kill(old)
    wait_until(
        lambda: group.slot_owner(group.keyslot(queues[0])) == replica.port,
        60,
        "the replica to take over the killed primary's slots",
    )
    took = time.monotonic() - killed_at
    thread.join(120)
    assert not thread.is_alive(), "the producer did not finish within 120 s"
    assert producer.error is None, f"the producer failed: {producer.error!r}"
    try:
        rig.ledger.wait_for(producer.ids, 60, alive=alive)
    except AssertionError:
        pass  # what is missing is judged below
    report = rig.ledger.report("cluster primary SIGKILLed under load", producer.ids)
    outside = [
        i
        for i in report.missing
        if producer.sent[i][0] != queues[0] or producer.sent[i][2] < killed_at - 1.0
    ]
    duplicates = sum(n - 1 for n in report.duplicates.values())
    print(
        f"[cluster primary SIGKILLed under load] promotion took {took:.2f} s; lost "
        f"{len(report.missing)} (acknowledged by the killed primary in its last second); "
        f"{duplicates} duplicate runs"
    )
    assert not outside, f"{len(outside)} tasks lost outside the replication window: {report}"
    assert not report.extra, report
    for worker in workers:
        assert worker.proc.poll() is None
    follow = [str(uuid.uuid4()) for _ in range(30)]
    for n, task_id in enumerate(follow):
        rig.broker.publish(queues[n % 3], encode_task(NOOP, (), task_id=task_id))
    rig.ledger.wait_for(follow, 30, alive=alive)
