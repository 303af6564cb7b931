"""SIGKILL at the worker, at its children, and a task that kills its own process.

Each test counts executions per task id in the ledger (see tests/faults/app.py): nothing may be
lost; duplicates are printed, and bounded where the guarantee bounds them (a killed worker can
only have run twice what it held unacknowledged: at most its prefetch window).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable

import pytest

from millpond.config import plugins
from millpond.testing.harness import WorkerProcess, wait_until
from millpond.wire.protocol import DEATH_REASON
from tests.faults.conftest import BROKERS
from tests.faults.harness import NAP, SUICIDE, Rig, prefork_children, process_tree, since

pytestmark = [pytest.mark.fault, pytest.mark.e2e]

TASKS = 5000
POOLS = [("prefork", 2), ("threads", 8), ("gevent", 50)]


@pytest.mark.parametrize("broker", BROKERS)
@pytest.mark.parametrize(("pool", "concurrency"), POOLS)
def test_sigkill_the_worker_under_load_then_restart_loses_nothing(
    make_rig: Callable[..., Rig], broker: str, pool: str, concurrency: int
) -> None:
    rig = make_rig(broker)
    ids = rig.load(TASKS)
    start = time.monotonic()
    worker = rig.spawn(pool, concurrency).wait_ready()
    at = rig.ledger.wait_progress(TASKS * 2 // 5, 60, alive=rig.alive(worker))
    tree = [p.pid for p in process_tree(worker.pid)]
    worker.signal(signal.SIGKILL)
    killed = time.monotonic()
    worker.wait(10)
    # nothing of the killed worker stays behind (prefork: fork server and children follow it)
    wait_until(
        lambda: not any(_alive(pid) for pid in tree), 10, "the killed worker's processes to exit"
    )
    killed_at = rig.ledger.progress()
    assert killed_at < TASKS * 9 // 10, "the kill came too late to leave work behind"
    restarted = rig.spawn(pool, concurrency).wait_ready()
    rig.ledger.wait_for(ids, 90, alive=rig.alive(restarted))
    report = rig.ledger.report(
        f"SIGKILL {pool} -c {concurrency} on {broker} at {at}..{killed_at} done; all done "
        f"{since(killed)} s after the kill ({since(start)} s in all)",
        ids,
    )
    assert not report.missing
    # the window the worker holds unacknowledged: the pool's own default multiplier (prefork: 16,
    # so its children's queues can be refilled without waiting for the broker), else 4
    prefetch = concurrency * (plugins.load(plugins.POOLS, pool).default_prefetch_multiplier or 4)
    assert len(report.duplicates) <= prefetch, (
        f"more duplicates than the killed worker could hold unacknowledged ({prefetch})"
    )
    assert all(n == 2 for n in report.duplicates.values()), report.duplicates
    restarted.signal(signal.SIGTERM)
    assert restarted.wait(30) == 0, restarted.text()[-3000:]


def _progress_reaches(rig: Rig, target: int) -> Callable[[], bool]:
    return lambda: rig.ledger.progress() >= target


def _died_or_dead_lettered(rig: Rig, worker: WorkerProcess) -> Callable[[], bool]:
    return lambda: worker.proc.poll() is not None or bool(rig.dead_letters())


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.redis
def test_prefork_children_killed_repeatedly_while_5000_tasks_run(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig("redis")
    ids = rig.load(TASKS, NAP, (0.001,))
    worker = rig.spawn("prefork", 4).wait_ready()
    alive = rig.alive(worker)
    rng = random.Random(8)
    kills = 0
    start = time.monotonic()
    while rig.ledger.progress() < TASKS * 9 // 10 and time.monotonic() - start < 60:
        alive()
        children = prefork_children(worker.pid)
        if children:
            victim = rng.choice(children)
            try:
                os.kill(victim, signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
        # the next kill waits for a little progress, so children keep being replaced under load
        target = min(rig.ledger.progress() + 60, TASKS)
        wait_until(
            _progress_reaches(rig, target),
            30,
            "progress between two kills",
            interval=0.005,
        )
    seen = rig.ledger.wait_for(ids, 60, alive=alive)
    dead = {m.task_id for m in rig.dead_letters()}
    report = rig.ledger.report(f"{kills} child kills, prefork -c 4, {TASKS} 1-ms tasks", ids)
    lost = [i for i in report.missing if i not in dead]
    assert not lost, f"{len(lost)} tasks neither ran nor were dead-lettered"
    assert kills >= 20, f"only {kills} kills happened: the test did not stress the pool"
    lost_logged = [
        line for line in worker.lines() if line.get("event") == "task lost its execution unit"
    ]
    print(f"{len(lost_logged)} jobs were lost with their child and requeued; {len(dead)} dead")
    assert lost_logged, "no job was reported lost: the kills never hit a busy child"
    wait_until(
        lambda: len(prefork_children(worker.pid)) == 4, 10, "the pool to be back at 4 children"
    )
    assert sum(seen.values()) >= TASKS
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.text()[-3000:]


@pytest.mark.parametrize("broker", BROKERS)
def test_a_task_that_kills_its_process_is_dead_lettered_at_the_cap(
    make_rig: Callable[..., Rig], broker: str
) -> None:
    rig = make_rig(broker, MILLPOND_MAX_DELIVERIES="3")
    worker = rig.spawn("prefork", 2).wait_ready()
    (poison,) = rig.publish(1, SUICIDE)
    others = rig.publish(200)
    alive = rig.alive(worker)
    rig.ledger.wait_for(others, 60, alive=alive)
    dead = wait_until(rig.dead_letters, 30, "the poison message to be dead-lettered")
    assert [m.task_id for m in dead] == [poison]
    reason = dead[0].headers[DEATH_REASON]
    print(f"dead-letter reason: {reason}")
    assert "max_deliveries=3" in reason
    assert rig.ledger.counts("started")[poison] == 3, "the poison ran more often than the cap"
    backend = rig.producer.backend
    if backend is not None:  # RabbitMQ has no result backend of its own
        meta = backend.peek(poison)
        assert meta is not None and meta.status == "FAILURE", meta
        assert meta.result["exc_type"] == "WorkerLostError", meta.result
    # the worker lived through it and still runs tasks
    after = rig.publish(20)
    rig.ledger.wait_for(after, 30, alive=alive)
    logged = [line for line in worker.lines() if "dead-letter" in str(line.get("event"))]
    assert logged and logged[-1].get("task_id") == poison, logged
    lost = [line for line in worker.lines() if line.get("event") == "task lost its execution unit"]
    assert len(lost) == 3
    assert all("SIGKILL" in str(line.get("reason")) for line in lost), lost
    report = rig.ledger.report(f"poison message on {broker}", others + after)
    assert not report.missing
    rig.assert_no_duplicates(report)
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0


@pytest.mark.redis
def test_a_task_that_kills_the_whole_worker_is_dead_lettered_across_restarts(
    make_rig: Callable[..., Rig],
) -> None:
    """Under a pool without child processes the poison takes the worker with it: the count comes
    from the broker (Redis restores a dead consumer's messages counting the delivery), and the
    worker that receives it over the cap dead-letters it before running it. Prefetch 1, so the
    worker holds nothing else when it dies (every message a worker holds when it dies is counted:
    see docs/guarantees.md)."""
    rig = make_rig("redis", MILLPOND_MAX_DELIVERIES="2", MILLPOND_PREFETCH_MULTIPLIER="1")
    (poison,) = rig.publish(1, SUICIDE)
    others = rig.publish(100)
    deaths = 0
    for _ in range(4):
        # no wait_ready: the poison may kill the worker a moment after it became ready
        worker = rig.spawn("threads", 1)
        try:
            wait_until(
                _died_or_dead_lettered(rig, worker),
                30,
                "the worker to die or the poison to be dead-lettered",
            )
        except AssertionError:
            raise AssertionError(worker.text()[-3000:]) from None
        if worker.proc.poll() is not None:
            assert worker.proc.returncode == -signal.SIGKILL, worker.text()[-3000:]
            assert "worker ready" in worker.text()
            deaths += 1
            continue
        break
    dead = rig.dead_letters()
    assert [m.task_id for m in dead] == [poison], f"after {deaths} deaths"
    assert deaths == 2
    reason = dead[0].headers[DEATH_REASON]
    print(f"after {deaths} worker deaths: {reason}")
    assert "over max_deliveries=2" in reason
    rig.ledger.wait_for(others, 30, alive=rig.alive(worker))
    report = rig.ledger.report("poison under threads", others)
    assert not report.missing
    rig.assert_no_duplicates(report)
    assert rig.ledger.counts("started")[poison] == 2
