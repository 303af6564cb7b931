"""Rate limits end to end: `millpond worker` subprocesses on Redis and RabbitMQ, fed by a real
Celery producer, measured by the start times the tasks record.

* A flood of a limited task (10/s) queued in front of unlimited ones does not hold them back (Celery
  keeps the flood in its prefetch window and the unlimited tasks wait behind it), and the limited
  ones start at the rate, within tolerance.
* A global limit (4/s) is one bucket for two workers: together they start at that rate.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from millpond.testing.harness import WorkerProcess, forget_queue, wait_until
from tests.e2e.harness import ROOT

REDIS = "redis://127.0.0.1:6379/0"
AMQP = "amqp://guest:guest@127.0.0.1:5672//"
BROKERS = {"redis": REDIS, "amqp": AMQP}


def most_within(times: list[float], window: float) -> int:
    """The most of `times` (sorted) inside any `window` seconds."""
    most, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] > window:
            start += 1
        most = max(most, end - start + 1)
    return most


def logged(tmp_path: Path) -> list[str]:
    """The complete lines of runs.log: a task may be writing its line while the test reads."""
    path = tmp_path / "runs.log"
    if not path.exists():
        return []
    text = path.read_text()
    return text[: text.rfind("\n") + 1].splitlines()


def task_ids(tmp_path: Path, kind: str) -> list[str]:
    return [line.split()[3] for line in logged(tmp_path) if line.split()[0] == kind]


def runs(tmp_path: Path, kind: str) -> list[tuple[float, int]]:
    out = []
    for line in logged(tmp_path):
        name, started, pid, _ = line.split()
        if name == kind:
            out.append((float(started), int(pid)))
    return sorted(out)


@pytest.fixture(params=sorted(BROKERS))
def broker(request: pytest.FixtureRequest) -> str:
    return BROKERS[request.param]


@pytest.fixture
def queue(broker: str) -> Iterator[str]:
    name = f"rl-{uuid.uuid4().hex[:10]}"
    yield name
    forget_queue(broker, name)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Any]:
    started: list[WorkerProcess] = []

    def spawn(broker: str, queue: str, *args: str, **env: str) -> WorkerProcess:
        worker = WorkerProcess(
            ["-A", "tests.e2e.ratelimit_app:app", "-P", "threads", "-Q", queue, *args],
            {
                "MILLPOND_BROKER_URL": broker,
                "MILLPOND_RESULT_BACKEND": REDIS,
                "MILLPOND_IGNORE_RESULT": "true",
                # the app has a globally limited task too: its bucket is in Redis
                "MILLPOND_RATE_LIMIT_STORE": REDIS,
                "E2E_DIR": str(tmp_path),
                **env,
            },
            tmp_path,
            name=f"worker-{len(started)}",
            cwd=ROOT,
        )
        started.append(worker)
        return worker

    yield spawn
    for worker in started:
        worker.kill()


def celery_producer(broker: str, queue: str) -> Any:
    from celery import Celery

    app = Celery("rl-producer", broker=broker)
    app.conf.update(task_default_queue=queue, task_serializer="json", accept_content=["json"])
    return app


def test_a_limited_flood_does_not_hold_back_unlimited_tasks(
    broker: str, queue: str, workers: Any, tmp_path: Path
) -> None:
    workers(broker, queue, "-c", "4", "--prefetch-multiplier", "1").wait_ready()
    celery = celery_producer(broker, queue)
    try:
        with celery.connection_for_write() as conn:
            producer = celery.amqp.Producer(conn)
            for n in range(40):  # 4 s of work at 10/s, all in front of the unlimited ones
                celery.send_task("rl.limited", (n,), queue=queue, producer=producer)
            for n in range(60):
                celery.send_task("rl.free", (n,), queue=queue, producer=producer)
    finally:
        celery.close()

    free = wait_until(lambda: len(runs(tmp_path, "free")) >= 60 and runs(tmp_path, "free"), 30,
                      "the 60 unlimited tasks to run")  # fmt: skip
    limited = wait_until(
        lambda: len(runs(tmp_path, "limited")) >= 40 and runs(tmp_path, "limited"),
        60,
        lambda: f"the 40 limited tasks to run (ran {len(runs(tmp_path, 'limited'))})",
    )
    starts = [t for t, _ in limited]
    last_free = free[-1][0]
    # the unlimited tasks did not wait for the flood (behind it they would end 4 s in)
    assert last_free - starts[0] < 2.0, (
        f"the unlimited tasks finished {last_free - starts[0]:.2f} s after the first limited one"
    )
    assert sum(1 for t in starts if t <= last_free) < 25
    # 10/s: 11 in a second at most (the bucket's first token), one more for the threads' hand-off
    assert most_within(starts, 1.0) <= 12, f"{most_within(starts, 1.0)} limited starts in 1 s"
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) > 0.03, f"two limited tasks started {min(gaps):.3f} s apart (10/s)"
    rate = (len(starts) - 1) / (starts[-1] - starts[0])
    assert 7.0 < rate <= 10.5, f"limited tasks started at {rate:.2f}/s (limit 10/s)"
    assert len(runs(tmp_path, "limited")) == 40, "a limited task ran twice"


def test_a_global_limit_is_shared_by_two_workers(
    queue: str, workers: Any, tmp_path: Path, broker: str
) -> None:
    import redis

    task = f"rl.shared.{uuid.uuid4().hex[:8]}"
    env = {"RL_SHARED_TASK": task}
    first = workers(broker, queue, "-c", "2", **env)
    second = workers(broker, queue, "-c", "2", **env)
    first.wait_ready()
    second.wait_ready()
    celery = celery_producer(broker, queue)
    try:
        with celery.connection_for_write() as conn:
            producer = celery.amqp.Producer(conn)
            for n in range(20):
                celery.send_task(task, (n,), queue=queue, producer=producer)
    finally:
        celery.close()
    try:
        shared = wait_until(
            lambda: len(runs(tmp_path, "shared")) >= 20 and runs(tmp_path, "shared"),
            60,
            lambda: f"the 20 globally limited tasks to run (ran {len(runs(tmp_path, 'shared'))})",
        )
    finally:
        redis.Redis.from_url(REDIS).delete(f"millpond:ratelimit:{task}")
    starts = [t for t, _ in shared]
    pids = {pid for _, pid in shared}
    assert pids == {first.pid, second.pid}, "both workers ran some of them"
    assert most_within(starts, 1.0) <= 6, f"{most_within(starts, 1.0)} starts in 1 s (4/s)"
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) > 0.1, f"two tasks started {min(gaps):.3f} s apart across workers (4/s)"
    rate = (len(starts) - 1) / (starts[-1] - starts[0])
    assert 2.5 < rate <= 4.2, f"the fleet started them at {rate:.2f}/s (global limit 4/s)"


def test_waiting_messages_of_a_killed_worker_come_back(
    broker: str, queue: str, workers: Any, tmp_path: Path
) -> None:
    """Messages waiting in a lane are unacknowledged and those handed back wait in the broker: a
    worker killed with both loses none of them; the next worker runs every one."""
    import signal

    # a killed worker's Redis messages come back once its lease lapses: make that soon (a lease
    # this short can also lapse under a loaded machine: a task may then run twice, never zero)
    lease = {"MILLPOND_REDIS__LEASE_TIMEOUT": "3", "MILLPOND_REDIS__HEARTBEAT_INTERVAL": "0.5"}
    first = workers(broker, queue, "-c", "2", "--prefetch-multiplier", "2", **lease).wait_ready()
    celery = celery_producer(broker, queue)
    try:
        sent = [celery.send_task("rl.slow", (n,), queue=queue).id for n in range(12)]
    finally:
        celery.close()
    wait_until(lambda: len(task_ids(tmp_path, "slow")) >= 2, 30, "two rl.slow tasks to run")
    first.signal(signal.SIGKILL)
    first.wait(10)
    workers(broker, queue, "-c", "2", **lease).wait_ready()
    wait_until(
        lambda: set(task_ids(tmp_path, "slow")) >= set(sent),
        60,
        lambda: f"all 12 rl.slow tasks to run (ran {len(set(task_ids(tmp_path, 'slow')))})",
    )
