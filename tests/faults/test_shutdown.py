"""Warm and cold shutdown under every pool, and SIGTERM while the worker is still starting.

Warm (SIGTERM): every running task finishes and is acknowledged, exit 0, and nothing runs twice;
what was fetched but never started goes back to the broker. Cold (SIGQUIT, or a second SIGINT):
running tasks are abandoned, their messages come back and run again on the next worker.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import psutil
import pytest

from millpond.testing.harness import WorkerProcess, wait_until
from millpond.testing.proxy import Proxy
from tests.faults.harness import NAP, Rig, process_tree, since

pytestmark = [pytest.mark.fault, pytest.mark.e2e]

WARM = [
    pytest.param("redis", "solo", 1, marks=pytest.mark.redis),
    pytest.param("redis", "threads", 100, marks=pytest.mark.redis),
    pytest.param("redis", "prefork", 100, marks=pytest.mark.redis),
    pytest.param("redis", "gevent", 100, marks=pytest.mark.redis),
    pytest.param("amqp", "threads", 100, marks=pytest.mark.amqp),
]


@pytest.mark.parametrize(("broker", "pool", "concurrency"), WARM)
def test_warm_shutdown_finishes_every_running_task_once(
    make_rig: Callable[..., Rig], broker: str, pool: str, concurrency: int
) -> None:
    rig = make_rig(broker)
    queued = 5 if concurrency == 1 else 50  # fetched (or waiting) but never started
    ids = rig.load(concurrency, NAP, (1.5,)) + rig.load(queued, NAP, (0.05,), wait=False)
    wait_until(
        lambda: rig.broker.queue_length(rig.queue) >= concurrency + queued, 30, "the queue to fill"
    )
    worker = rig.spawn(pool, concurrency).wait_ready()
    rig.ledger.wait_progress(concurrency, 30, kind="started", alive=rig.alive(worker))
    start = time.monotonic()
    worker.signal(signal.SIGTERM)
    code = worker.wait(30)
    took = since(start)
    assert code == 0, worker.text()[-3000:]
    started, done = rig.ledger.counts("started"), rig.ledger.counts("done")
    print(f"warm shutdown of {pool} -c {concurrency} on {broker}: {len(started)} running, {took} s")
    assert len(started) >= concurrency
    assert started == done, "a task that started did not finish during the warm shutdown"
    assert max(done.values()) == 1
    stopped = next(line for line in worker.lines() if line.get("event") == "worker stopped")
    assert stopped["shutdown"] == "warm"
    # the rest went back to the broker: a new worker runs exactly those, once each
    restarted = rig.spawn(pool, concurrency).wait_ready()
    rig.ledger.wait_for(ids, 60, alive=rig.alive(restarted))
    report = rig.ledger.report(f"warm shutdown, {pool} on {broker}", ids)
    assert not report.missing
    rig.assert_no_duplicates(report, "a warm shutdown acknowledges what it finished")
    assert rig.ledger.counts("started") == rig.ledger.counts("done")


COLD = [
    ("solo", 1, "SIGINT twice"),
    ("threads", 20, "SIGQUIT"),
    ("prefork", 20, "SIGINT twice"),
    ("gevent", 20, "SIGQUIT"),
]


def _cold(worker: WorkerProcess, how: str) -> None:
    if how == "SIGQUIT":
        worker.signal(signal.SIGQUIT)
        return
    worker.signal(signal.SIGINT)
    wait_until(
        lambda: any(line.get("event") == "warm shutdown requested" for line in worker.lines()),
        10,
        "the first SIGINT to start a warm shutdown",
    )
    worker.signal(signal.SIGINT)


@pytest.mark.redis
@pytest.mark.parametrize(("pool", "concurrency", "how"), COLD)
def test_cold_shutdown_gives_running_tasks_back(
    make_rig: Callable[..., Rig], pool: str, concurrency: int, how: str
) -> None:
    rig = make_rig("redis")
    nap = 2.5
    ids = rig.load(concurrency, NAP, (nap,))
    worker = rig.spawn(pool, concurrency).wait_ready()
    rig.ledger.wait_progress(concurrency, 30, kind="started", alive=rig.alive(worker))
    tree = [p.pid for p in process_tree(worker.pid)]
    start = time.monotonic()
    _cold(worker, how)
    code = worker.wait(nap)  # sooner than any running task could finish
    took = since(start)
    print(f"cold shutdown ({how}) of {pool} -c {concurrency}: exit {code} after {took} s")
    assert code == 1, worker.text()[-3000:]
    assert rig.ledger.counts("done") == {}, "a running task finished: that was not cold"
    wait_until(lambda: not any(psutil.pid_exists(p) for p in tree[1:]), 10, "children to exit")
    restarted = rig.spawn(pool, concurrency).wait_ready()
    rig.ledger.wait_for(ids, 60, alive=rig.alive(restarted))
    report = rig.ledger.report(f"cold shutdown ({how}), {pool}", ids)
    assert not report.missing
    rig.assert_no_duplicates(report)
    started = rig.ledger.counts("started")
    assert all(started[i] == 2 for i in ids), "each abandoned task runs again exactly once"


def _reached_or_exited(
    worker: WorkerProcess, reached: Callable[[WorkerProcess], object]
) -> Callable[[], bool]:
    return lambda: bool(reached(worker)) or worker.proc.poll() is not None


def _all_gone(pids: list[int]) -> Callable[[], bool]:
    return lambda: not any(psutil.pid_exists(p) for p in pids)


def _has_children(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).children())
    except psutil.Error:
        return False


@pytest.mark.redis
def test_sigterm_during_start_up_exits_cleanly_and_takes_nothing(
    make_rig: Callable[..., Rig],
) -> None:
    """SIGTERM at three moments of start-up: before the app is even imported, while the worker
    waits for a broker that refuses connections, and while the prefork pool forks (its signal
    handlers are in place, the consumer is not). The worker exits promptly (0 once its handlers
    are in place; before that SIGTERM's default action ends it), leaves no process behind, and
    runs or holds nothing: a worker started afterwards runs every task exactly once."""
    rig = make_rig("redis")
    ids = rig.load(300)
    proxy = Proxy(("127.0.0.1", 6379))
    proxy.block()
    unreachable = {"MILLPOND_BROKER_URL": f"redis://127.0.0.1:{proxy.port}/0"}
    held = {"FAULTS_HOLD_CHILDREN": str(rig.directory / "never-opened")}  # children never ready
    moments: list[tuple[str, dict[str, str], Callable[[WorkerProcess], object]]] = [
        ("at once", {}, lambda w: True),
        ("waiting for an unreachable broker", unreachable, lambda w: proxy.accepted > 0),
        ("forking the pool", held, lambda w: _has_children(w.pid)),
    ]
    outcomes = {}
    try:
        for moment, env, reached in moments:
            worker = rig.spawn("prefork", 4, env=env)
            wait_until(
                _reached_or_exited(worker, reached),
                20,
                f"start-up to reach '{moment}'",
                interval=0.002,
            )
            tree = [p.pid for p in process_tree(worker.pid)]
            ready = any(line.get("event") == "worker ready" for line in worker.lines())
            start = time.monotonic()
            worker.signal(signal.SIGTERM)
            code = worker.wait(20)
            outcomes[moment] = {"exit": code, "ready before": ready, "seconds": since(start)}
            assert not ready, f"{moment}: the worker was ready already; the test came too late"
            assert code in (0, -signal.SIGTERM), f"{moment}: exit {code}\n{worker.text()[-3000:]}"
            wait_until(
                _all_gone(tree[1:]),
                10,
                f"the pool's processes to exit ({moment})",
            )
            assert "Traceback" not in worker.text(), worker.text()[-3000:]
    finally:
        proxy.close()
    print(f"SIGTERM during start-up: {outcomes}")
    assert outcomes["forking the pool"]["exit"] == 0
    assert rig.ledger.counts() == {}, "a worker stopped during start-up ran tasks"
    worker = rig.spawn("prefork", 4).wait_ready()
    rig.ledger.wait_for(ids, 30, alive=rig.alive(worker))
    report = rig.ledger.report("after SIGTERM during start-up", ids)
    assert not report.missing
    rig.assert_no_duplicates(report)
