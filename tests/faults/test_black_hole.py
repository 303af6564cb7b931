"""A black-holed broker link (packets stop, the socket stays open) is noticed within 15 s with the
default settings, on Redis and RabbitMQ, and work resumes once packets flow again."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from millpond.testing.harness import WorkerProcess, wait_until
from millpond.testing.proxy import Proxy
from tests.faults.harness import NAP, Rig, since

#: what the worker logs when it gives up a link, per broker
FAILED = {"redis": "failed", "amqp": "lost the consumer connection"}
UPSTREAM = {"redis": 6379, "amqp": 5672}
URL = {
    "redis": "redis://127.0.0.1:{port}/0",
    "amqp": "amqp://guest:guest@127.0.0.1:{port}//",
}


def _failures(worker: WorkerProcess, needle: str) -> int:
    return sum(1 for line in worker.lines() if needle in str(line.get("event", "")))


@pytest.mark.slow
@pytest.mark.parametrize(
    "broker",
    [pytest.param("redis", marks=pytest.mark.redis), pytest.param("amqp", marks=pytest.mark.amqp)],
)
def test_a_black_holed_link_is_noticed_within_15_s_with_defaults(
    tmp_path: Path, broker: str
) -> None:
    proxy = Proxy(("127.0.0.1", UPSTREAM[broker]))
    # no timing settings at all: the defaults are what is tested (results go to Redis directly)
    rig = Rig(tmp_path, URL[broker].format(port=UPSTREAM[broker]), {})
    try:
        worker = rig.spawn(
            "threads", 4, env={"MILLPOND_BROKER_URL": URL[broker].format(port=proxy.port)}
        ).wait_ready()
        alive = rig.alive(worker)
        ids = rig.load(400, NAP, (0.01,), wait=False)
        rig.ledger.wait_progress(50, 60, alive=alive)
        before = _failures(worker, FAILED[broker])
        proxy.stall()
        stalled = time.monotonic()
        wait_until(
            lambda: _failures(worker, FAILED[broker]) > before,
            30,
            f"the worker to notice the black-holed {broker} link",
        )
        noticed = since(stalled)
        proxy.resume()
        rig.ledger.wait_for(ids, 90, alive=alive)
        report = rig.ledger.report(f"{broker}: black hole noticed after {noticed} s", ids)
        print(json.dumps({"broker": broker, "noticed_after_s": noticed}))
        assert not report.missing
        assert noticed <= 15.0, f"a black-holed {broker} link went unnoticed for {noticed} s"
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.text()[-3000:]
    finally:
        rig.close()
        proxy.close()
