"""docs/events.md runs as written: its Python block, Celery 5.7's own event receiver, reads a
`millpond worker -E` of the example shop on Redis, on a queue of the test's own."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.e2e.docs_runner import DOCS, clean_env, forget_redis_queue, guide_worker, run_guide

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

REDIS_URL = "redis://127.0.0.1:6379/0"


def test_the_event_receiver_of_the_events_guide_reads_a_millpond_worker(tmp_path: Path) -> None:
    queue = f"docs-events-{uuid.uuid4().hex[:10]}"
    env = clean_env(
        MILLPOND_BROKER_URL=REDIS_URL, MILLPOND_QUEUES=queue, MILLPOND_DEFAULT_QUEUE=queue
    )
    args = ["-A", "examples.shop:app", "-P", "threads", "-E", "-n", f"{queue}@docs"]
    try:
        with guide_worker(args, env, tmp_path / "worker.log") as log:
            printed = run_guide(DOCS / "events.md", env, worker_log=log)
        assert f"{queue}@docs task-succeeded" in printed
    finally:
        forget_redis_queue(REDIS_URL, queue)
