"""docs/control.md runs as written: its Python blocks (millpond's app.control and Celery's)
against a `millpond worker` of the example shop on Redis, in a control namespace of its own."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from millpond.testing.harness import WorkerProcess
from tests.e2e.docs_runner import DOCS, clean_env, forget_redis_queue, run_guide
from tests.e2e.harness import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

REDIS_URL = "redis://127.0.0.1:6379/0"


def test_the_control_guide_runs_against_a_millpond_worker(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:10]
    queue = f"docs-control-{tag}"
    env = clean_env(
        REDIS_URL=REDIS_URL,
        QUEUE=queue,
        CONTROL_EXCHANGE=f"docs-{tag}",
        MILLPOND_CONTROL__EXCHANGE=f"docs-{tag}",
        MILLPOND_HOME=str(tmp_path / "home"),
    )
    worker_env = {
        **env,
        "MILLPOND_BROKER_URL": REDIS_URL,
        "MILLPOND_QUEUES": queue,
        "MILLPOND_DEFAULT_QUEUE": queue,
    }
    worker = WorkerProcess(
        ["-A", "examples.shop:app", "-P", "threads"], worker_env, tmp_path, cwd=ROOT
    )
    try:
        worker.wait_ready(60)
        run_guide(DOCS / "control.md", env, worker_log=worker.stderr_path)
    finally:
        worker.stop()
        forget_redis_queue(REDIS_URL, queue)
