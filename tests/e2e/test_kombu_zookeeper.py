"""1,000 tasks, some retrying, through `millpond worker` on Zookeeper (kombu's transport on a
private server), results in a sqlite file: each runs exactly once. The worker needs no
allow_message_loss (it claims messages into in-flight znodes, see tests/faults for a kill), and a
countdown is refused at the producer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from millpond.exceptions import PublishError
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
        # a retry's countdown cannot wait in Zookeeper: these fail, with the reason, not vanish
        retried = [encode_task(RETRY_ONCE, ()) for _ in range(50)]
        for m in plain + retried:
            rig.broker.publish(rig.queue, m)
        with pytest.raises(PublishError, match="no broker-held delays"):
            rig.broker.publish(rig.queue, encode_task(NOOP, ()), eta=time.time() + 5)

        worker = rig.spawn("threads", 8).wait_ready()
        rig.ledger.wait_for([m.task_id or "" for m in plain], 120, alive=rig.alive(worker))
        rig.ledger.wait_for([m.task_id or "" for m in retried], 60, kind="tried")
        report = rig.ledger.report("zookeeper", [m.task_id or "" for m in plain])
        assert not report.missing and not report.duplicates, report
    finally:
        rig.close()
