"""A revoke holds: a revoked task is run by none of three workers, one of them started after the
revoke, while it waits out its countdown in the broker; and it still holds after a restart.

Each worker keeps its revoked ids in a file of its own (a MILLPOND_HOME of its own), so the worker
started late can only know of the revoke from the others (the start-up `hello`), and the restarted
one only from its file (mingle off).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from millpond import Millpond
from millpond.testing.harness import WorkerProcess, wait_until
from tests.e2e.harness import ROOT, lines_of

pytestmark = pytest.mark.e2e

WAIT = 60.0
#: long enough for the late worker to start and the early ones to stop before the task is due
#: (about 3 s on a loaded two-core machine: four times that; each test checks it had the time)
COUNTDOWN = 12.0
#: long enough for the revoke and the stop (about 1.5 s there) before the task is due
RESTART_COUNTDOWN = 8.0


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    broker = (
        f"sqlite://{tmp_path / 'broker.sqlite3'}?lease_timeout=3&heartbeat_interval=0.5"
        if request.param == "sqlite"
        else "redis://127.0.0.1:6379/0"
    )
    return {
        "MILLPOND_BROKER_URL": broker,
        "MILLPOND_QUEUES": f"revoke-{tag}",
        "MILLPOND_DEFAULT_QUEUE": f"revoke-{tag}",
        "MILLPOND_CONTROL__EXCHANGE": f"revoke-{tag}",  # this test's workers only
        "E2E_DIR": str(tmp_path),
        "MILLPOND_SHUTDOWN_TIMEOUT": "20",
    }


def _spawn(env: dict[str, str], tmp: Path, name: str, **extra: str) -> WorkerProcess:
    home = tmp / f"home-{name}"
    worker = WorkerProcess(
        ["-A", "tests.e2e.app:app", "-P", "threads", "-c", "2"],
        {**env, "MILLPOND_HOME": str(home), "MILLPOND_WORKER_NAME": f"{name}@e2e", **extra},
        tmp,
        name=name,
        cwd=ROOT,
    )
    return worker.wait_ready(WAIT)


def _revoke(env: dict[str, str], task_id: str, replies: int) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "millpond", "control", "revoke", task_id, "-t", "3"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("flagged as revoked") == replies, done.stdout
    return done.stdout


def _discarded(worker: WorkerProcess, task_id: str) -> bool:
    return any(
        line.get("event") == "discarding a revoked task" and line.get("task_id") == task_id
        for line in worker.lines()
    )


def _producer(env: dict[str, str]) -> Millpond:
    return Millpond(
        "e2e", broker_url=env["MILLPOND_BROKER_URL"], default_queue=env["MILLPOND_DEFAULT_QUEUE"]
    )


def test_revoked_task_runs_on_no_worker_including_one_started_later(
    env: dict[str, str], tmp_path: Path
) -> None:
    workers: list[WorkerProcess] = []
    app = _producer(env)
    try:
        workers += [_spawn(env, tmp_path, "first"), _spawn(env, tmp_path, "second")]
        due = time.time() + COUNTDOWN
        handle = app.send_task("tests.e2e.app.count", countdown=COUNTDOWN)
        _revoke(env, handle.id, replies=2)
        late = _spawn(env, tmp_path, "late")
        workers.append(late)
        assert any(
            str(line.get("event", "")).startswith("mingle: synced with 2 worker(s) of 2, 1 new")
            for line in late.lines()
        ), late.text()
        for early in workers[:2]:  # only the late worker is left to receive it when it is due
            early.signal(15)
            assert early.wait(WAIT) == 0
        left = due - time.time()
        assert left > 0.5, f"the machine is too slow for this test's countdown ({left:.1f} s left)"
        wait_until(
            lambda: _discarded(late, handle.id),
            WAIT,
            f"the late worker to discard {handle.id} after its countdown",
        )
        assert handle.id not in lines_of(tmp_path / "ran.log")
        meta = app.backend.peek(handle.id) if app.backend else None
        assert meta is not None and meta.status == "REVOKED"
        assert meta.result["exc_type"] == "TaskRevokedError"
        assert meta.result["exc_module"] == "celery.exceptions"

        # a task that is not revoked still runs (the discard is not a stuck queue)
        ok = app.send_task("tests.e2e.app.count")
        assert ok.get(timeout=WAIT) == ok.id
    finally:
        app.close()
        for worker in workers:
            worker.kill()


def test_revoke_survives_a_restart(env: dict[str, str], tmp_path: Path) -> None:
    app = _producer(env)
    worker: WorkerProcess | None = None
    try:
        worker = _spawn(env, tmp_path, "keeper")
        due = time.time() + RESTART_COUNTDOWN
        handle = app.send_task("tests.e2e.app.count", countdown=RESTART_COUNTDOWN)
        _revoke(env, handle.id, replies=1)
        worker.signal(15)
        assert worker.wait(WAIT) == 0
        left = due - time.time()  # the task is still in the broker: the restart must discard it
        assert left > 0.5, f"the machine is too slow for this test's countdown ({left:.1f} s left)"
        # the same worker again, on the same revoked file, with nobody to ask
        worker = _spawn(env, tmp_path, "keeper", MILLPOND_CONTROL__MINGLE="false")
        wait_until(
            lambda: _discarded(worker, handle.id) if worker else False,
            WAIT,
            f"the restarted worker to discard {handle.id}",
        )
        assert handle.id not in lines_of(tmp_path / "ran.log")
    finally:
        app.close()
        if worker is not None:
            worker.kill()
