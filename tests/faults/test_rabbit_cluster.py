"""A three-node RabbitMQ cluster with quorum queues loses a node under load: the node the worker
and the producer are connected to is SIGKILLed while 5,000 tasks run.

The cluster is private (`millpond.testing.servers.RabbitCluster`: three nodes with their own
names, ports and data directories, joined with `rabbitmqctl join_cluster`); the worker and the
producer get the three nodes as one failover URL (`amqp://...:p1//;amqp://...:p2//;...`), the first
node first, so both start on the node that dies. Quorum queues replicate every message to a
majority before RabbitMQ confirms it, so losing one node of three loses nothing: the survivors
elect a new leader, the worker reconnects to the next node of its list and RabbitMQ redelivers
what the dead connection held (duplicates, counted and allowed). Dead letters, in their own
quorum queue, survive the node too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from millpond.testing.harness import wait_until
from millpond.testing.servers import RabbitCluster
from tests.faults.harness import Rig

pytestmark = [pytest.mark.fault, pytest.mark.e2e, pytest.mark.slow]

TASKS = 5000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    made = RabbitCluster(tmp_path_factory.mktemp("rabbit-cluster")).start()
    try:
        yield made
    finally:
        made.stop()


def _queue_types(cluster: RabbitCluster, via: int, names: set[str]) -> dict[str, str]:
    text = cluster.nodes[via].ctl("list_queues", "name", "type", "--no-table-headers", "-q")
    rows = (line.split("\t") for line in text.splitlines() if "\t" in line)
    return {name: kind for name, kind in rows if name in names}


def test_killing_the_workers_node_loses_nothing(
    make_rig: Callable[..., Rig], cluster: RabbitCluster, tmp_path: Path
) -> None:
    url = cluster.urls(0, 1, 2)
    url = url.replace("//;", "//?queue_type=quorum;", 1)  # options ride on the first member
    rig = make_rig("amqp", url=url)
    # five messages no worker can run go to the (quorum) dead-letter queue before the kill
    unknown = rig.publish(5, "tests.faults.app.no_such_task")
    ids = rig.load(TASKS)
    dead = f"{rig.queue}.dead"
    assert _queue_types(cluster, 1, {rig.queue, dead}) == {rig.queue: "quorum", dead: "quorum"}
    worker = rig.spawn("threads", 8).wait_ready()
    alive = rig.alive(worker)
    at = rig.ledger.wait_progress(1500, 60, alive=alive)
    killed_at = time.monotonic()
    cluster.kill(0)  # the node both the worker and the producer are connected to
    # the producer follows too: confirmed publishes after the kill go to a surviving node
    late = rig.publish(200)
    published_after = time.monotonic() - killed_at
    seen = rig.ledger.wait_for([*ids, *late], 180, alive=alive)
    report = rig.ledger.report(f"RabbitMQ node killed at {at} done (quorum queues)", [*ids, *late])
    resumed = time.monotonic() - killed_at
    print(
        f"[rabbit cluster] 200 confirmed publishes took {published_after:.2f} s after the kill; "
        f"all {len(seen)} done {resumed:.2f} s after it"
    )
    assert not report.missing
    assert not report.extra
    assert "node 2 of 3" in worker.text(), "the worker did not say which node it moved to"
    wait_until(lambda: rig.broker.queue_length(rig.queue) == 0, 30, "the queue to be empty")
    # the dead letters survived the node that held them as leader
    buried = {m.headers.get("id") for m in rig.dead_letters()}
    assert set(unknown) <= buried, f"dead letters lost with the node: {set(unknown) - buried}"


def test_a_celery_producer_feeds_a_millpond_worker_on_the_cluster(
    make_rig: Callable[..., Rig], cluster: RabbitCluster
) -> None:
    """A Celery 5.7 producer that creates its queues as quorum queues
    (`task_create_missing_queue_type`: `task_default_queue_type` covers only Celery's default
    queue) uses the same failover URL and the same arguments as millpond, so it feeds millpond
    workers on the cluster."""
    import uuid

    from celery import Celery

    url = cluster.urls(1, 2, 0)
    rig = make_rig("amqp", url=url, MILLPOND_AMQP__QUEUE_TYPE="quorum")
    worker = rig.spawn("threads", 4).wait_ready()
    celery = Celery("cluster-producer", broker=url)
    celery.conf.update(
        task_default_queue_type="quorum",
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        task_create_missing_queue_type="quorum",
    )
    try:
        ids = [str(uuid.uuid4()) for _ in range(200)]
        for task_id in ids:
            celery.send_task("tests.faults.app.noop", queue=rig.queue, task_id=task_id)
        rig.ledger.wait_for(ids, 60, alive=rig.alive(worker))
        report = rig.ledger.report("Celery producer on the cluster", ids)
        assert not report.missing and not report.duplicates
        # asked through node 1: the test before this one may have killed node 0
        assert _queue_types(cluster, 1, {rig.queue}) == {rig.queue: "quorum"}
    finally:
        celery.close()
