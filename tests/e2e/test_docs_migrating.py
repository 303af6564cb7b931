"""docs/migrating-from-celery.md runs as written: its Python blocks, a real Celery 5.7 producer,
against a `millpond worker` of the example shop on Redis, on a queue of the test's own."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.e2e.docs_runner import DOCS, clean_env, forget_redis_queue, guide_worker, run_guide

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

REDIS_URL = "redis://127.0.0.1:6379/0"


def test_the_celery_producer_of_the_migration_guide_runs_against_a_millpond_worker(
    tmp_path: Path,
) -> None:
    queue = f"docs-migrating-{uuid.uuid4().hex[:10]}"
    env = clean_env(
        REDIS_URL=REDIS_URL,
        QUEUE=queue,
        MILLPOND_BROKER_URL=REDIS_URL,
        MILLPOND_QUEUES=queue,
        MILLPOND_DEFAULT_QUEUE=queue,
    )
    try:
        args = ["-A", "examples.shop:app", "-P", "threads"]
        with guide_worker(args, env, tmp_path / "worker.log") as log:
            run_guide(DOCS / "migrating-from-celery.md", env, worker_log=log)
    finally:
        forget_redis_queue(REDIS_URL, queue)
