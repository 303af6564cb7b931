"""1,000 tasks, some retrying, through `millpond worker` on Zookeeper (kombu's transport on a
private server), results in a sqlite file: each runs exactly once, the retries' countdowns held
in Zookeeper. The worker needs no allow_message_loss (it claims messages into in-flight znodes,
see tests/faults for a kill). And a Celery producer's countdown task waits in Zookeeper, not in
the worker, and runs once due."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from millpond.wire.protocol import encode_task
from tests.faults.harness import NOOP, Rig

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RETRY_ONCE = "tests.faults.app.retry_once"


@pytest.fixture(scope="module")
def zookeeper() -> Iterator[object]:
    from millpond_broker_kombu.testing import ZookeeperServer, zookeeper_missing

    missing = zookeeper_missing()
    if missing:
        pytest.skip(missing)
    with ZookeeperServer() as server:
        yield server


def test_a_thousand_tasks_run_once_each(zookeeper: object, tmp_path: Path) -> None:
    url = zookeeper.url  # type: ignore[attr-defined]
    backend = f"sqlite://{tmp_path / 'results.db'}"
    rig = Rig(tmp_path, url, {"MILLPOND_IGNORE_RESULT": "false",
                              "MILLPOND_RESULT_BACKEND": backend})  # fmt: skip
    try:
        plain = [encode_task(NOOP, ()) for _ in range(950)]
        # each retries once with countdown=1: the retry waits in Zookeeper's delayed znodes
        retried = [encode_task(RETRY_ONCE, ()) for _ in range(50)]
        for m in plain + retried:
            rig.broker.publish(rig.queue, m)

        worker = rig.spawn("threads", 8).wait_ready()
        rig.ledger.wait_for([m.task_id or "" for m in plain], 120, alive=rig.alive(worker))
        rig.ledger.wait_for([m.task_id or "" for m in retried], 60, kind="tried")
        everything = [m.task_id or "" for m in plain + retried]
        rig.ledger.wait_for(everything, 60, alive=rig.alive(worker))
        report = rig.ledger.report("zookeeper", everything)
        assert not report.missing and not report.duplicates, report
    finally:
        rig.close()


def test_a_celery_countdown_waits_in_zookeeper(zookeeper: object, tmp_path: Path) -> None:
    """Celery 5's `apply_async(countdown=2)` puts the task in the queue at once with an eta; the
    worker hands it back to Zookeeper's delayed znodes and runs it once due, not before."""
    from celery import Celery

    from millpond_broker_kombu.link import release

    url = zookeeper.url  # type: ignore[attr-defined]
    rig = Rig(tmp_path, url)
    celery = Celery("zk-producer", broker=url)
    try:
        worker = rig.spawn("threads", 2).wait_ready()
        sent = time.time()
        result = celery.send_task(NOOP, (), queue=rig.queue, countdown=2)
        rig.ledger.wait_for([result.id], 30, alive=rig.alive(worker))
        # the ledger's file was written when the task ran
        ran = (rig.ledger.directory / "done.log").stat().st_mtime - sent
        print(f"a countdown=2 task ran {ran:.3f} s after it was sent")
        assert ran >= 2.0 - 0.01, f"ran {ran:.3f} s after it was sent, before its countdown"
        assert ran < 10.0, f"ran {ran:.3f} s after it was sent: the delay was not kept in time"
        assert rig.ledger.counts()[result.id] == 1
    finally:
        with celery.pool.acquire() as conn:
            release(conn)
        celery.close()
        rig.close()
