"""`millpond worker` subprocesses on the Postgres broker: results, delays, and a SIGKILL under
load that loses nothing.

The workers are real processes (tests/e2e/harness.py); the ledger of tests/faults counts
executions per task id, so a lost task (no line) and a duplicate (two lines) are told apart.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.faults.harness import SUICIDE, Rig, kill_tree, since

from millpond import Millpond, chord, group
from millpond.config import plugins
from millpond.contracts.broker import dead_letter_queue
from millpond.testing.harness import wait_until
from millpond.wire.protocol import DEATH_REASON

pytestmark = [pytest.mark.e2e]

TASKS = 5000
#: short leases: a killed worker's messages come back within about 1.5 s
FAST = {
    "MILLPOND_POSTGRES__LEASE_TIMEOUT": "1",
    "MILLPOND_POSTGRES__HEARTBEAT_INTERVAL": "0.2",
}


@pytest.fixture
def make_rig(tmp_path: Path, postgres_url: str) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(**env: str) -> Rig:
        directory = tmp_path / f"rig-{len(made)}"
        directory.mkdir()
        rig = Rig(directory, postgres_url, {**FAST, **env})
        made.append(rig)
        return rig

    yield make
    for rig in made:
        for worker in rig.workers:
            kill_tree(worker.pid)
        if rig._producer is not None:
            rig.broker.purge(rig.queue)
            rig.broker.purge(dead_letter_queue(rig.queue))
        rig.close()


@pytest.mark.parametrize(("pool", "concurrency"), [("prefork", 2), ("threads", 8)])
def test_sigkill_the_worker_under_load_then_restart_loses_nothing(
    make_rig: Callable[..., Rig], pool: str, concurrency: int
) -> None:
    rig = make_rig()
    ids = rig.load(TASKS)
    start = time.monotonic()
    worker = rig.spawn(pool, concurrency).wait_ready()
    at = rig.ledger.wait_progress(TASKS * 2 // 5, 60, alive=rig.alive(worker))
    kill_tree(worker.pid)
    killed = time.monotonic()
    worker.wait(10)
    killed_at = rig.ledger.progress()
    assert killed_at < TASKS * 9 // 10, "the kill came too late to leave work behind"
    restarted = rig.spawn(pool, concurrency).wait_ready()
    rig.ledger.wait_for(ids, 90, alive=rig.alive(restarted))
    report = rig.ledger.report(
        f"SIGKILL {pool} -c {concurrency} on postgres at {at}..{killed_at} done; all done "
        f"{since(killed)} s after the kill ({since(start)} s in all)",
        ids,
    )
    assert not report.missing
    # the window the worker holds unacknowledged: the pool's own default multiplier, else 4
    prefetch = concurrency * (plugins.load(plugins.POOLS, pool).default_prefetch_multiplier or 4)
    assert len(report.duplicates) <= prefetch, (
        f"more duplicates than the killed worker could hold unacknowledged ({prefetch})"
    )
    assert all(n == 2 for n in report.duplicates.values()), report.duplicates
    assert rig.broker.queue_length(rig.queue) == 0
    restarted.signal(signal.SIGTERM)
    assert restarted.wait(30) == 0, restarted.text()[-3000:]


def test_results_and_countdowns_through_a_worker(
    make_rig: Callable[..., Rig], postgres_url: str
) -> None:
    """A producer with results on Postgres (the broker's own backend): `get()` returns what the
    worker stored, a failure comes back as Celery's exception layout, a countdown runs after its
    delay and not before, and `publish_many` (a group) reaches the worker."""
    rig = make_rig(MILLPOND_IGNORE_RESULT="false")
    worker = rig.spawn("threads", 4, "-A", "tests.e2e.app:app").wait_ready()
    app = Millpond(
        "pg-producer", broker_url=postgres_url, default_queue=rig.queue, queues=[rig.queue]
    )
    try:
        add = "tests.e2e.app.add"
        assert app.send_task(add, (2, 3)).get(timeout=20) == 5
        failed = app.send_task("tests.e2e.app.fail", ("boom",))
        with pytest.raises(Exception, match="boom"):
            failed.get(timeout=20)
        sent = time.time()
        later = app.send_task(add, (1, 1), countdown=1.0)
        assert later.get(timeout=20) == 2
        assert time.time() - sent >= 1.0, "a countdown of 1 s ran early"
        results = group(app.signature(add, (i, i)) for i in range(20)).apply_async()
        assert results.get(timeout=30) == [2 * i for i in range(20)]
    finally:
        app.close()
    wait_until(lambda: rig.broker.queue_length(rig.queue) == 0, 10, "the queue to drain")
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.text()[-3000:]


def test_a_task_that_kills_its_process_is_dead_lettered_at_the_cap(
    make_rig: Callable[..., Rig],
) -> None:
    """The delivery count lives in the table: a poison message that kills the prefork child
    every time runs `max_deliveries` times, then waits in `<queue>.dead` with the reason, and
    its result says FAILURE / WorkerLostError; the other tasks all run."""
    rig = make_rig(MILLPOND_MAX_DELIVERIES="3", MILLPOND_IGNORE_RESULT="false")
    worker = rig.spawn("prefork", 2).wait_ready()
    (poison,) = rig.publish(1, SUICIDE)
    others = rig.publish(200)
    alive = rig.alive(worker)
    rig.ledger.wait_for(others, 60, alive=alive)
    dead = wait_until(rig.dead_letters, 30, "the poison message to be dead-lettered")
    assert [m.task_id for m in dead] == [poison]
    assert "max_deliveries=3" in dead[0].headers[DEATH_REASON]
    assert rig.ledger.counts("started")[poison] == 3, "the poison ran more often than the cap"
    backend = rig.producer.backend
    assert backend is not None
    meta = wait_until(lambda: backend.peek(poison), 10, "the poison's result")
    assert meta.status == "FAILURE", meta
    assert meta.result["exc_type"] == "WorkerLostError", meta.result


def test_a_chord_runs_its_body_once_through_workers(
    make_rig: Callable[..., Rig], postgres_url: str
) -> None:
    """A chord whose join is kept in Postgres: two workers run the header, one sends the body."""
    rig = make_rig(MILLPOND_IGNORE_RESULT="false")
    workers = [rig.spawn("threads", 4, "-A", "examples.shop:app").wait_ready() for _ in range(2)]
    app = Millpond(
        "pg-chords", broker_url=postgres_url, default_queue=rig.queue, queues=[rig.queue]
    )
    try:
        lines = [("apple", 3), ("pear", 2), ("plum", 5), ("fig", 1)] * 5
        header = [app.signature("examples.shop.price_line", line) for line in lines]
        result = chord(header)(app.signature("examples.shop.order_total"))
        total = result.get(timeout=30)
        # what examples/shop.py charges per line
        expected = round(sum(round(q * (1.5 + len(sku) / 10), 2) for sku, q in lines), 2)
        assert total == expected
    finally:
        app.close()
    sent = sum(w.text().count("chord complete; sending its body") for w in workers)
    assert sent == 1, f"the chord's body was sent {sent} times"
    for w in workers:
        w.signal(signal.SIGTERM)
        assert w.wait(30) == 0, w.text()[-3000:]
