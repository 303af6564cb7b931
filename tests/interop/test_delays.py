"""Countdowns across libraries: a task sent with a countdown to a queue the other library's worker
serves runs once, after its eta, in both directions, on Redis and RabbitMQ. On Redis this is
millpond's `delays = auto`: with no millpond worker on the Celery worker's queue, a millpond
producer sends a delayed task Celery-style (eta in the headers) instead of holding it in a sorted
set no Celery worker reads."""

from __future__ import annotations

import json
import time
from datetime import datetime

import pytest

from tests.interop import sink
from tests.interop.conftest import WAIT, Direction, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.slow]

COUNTDOWN = 2.0


def done_at(task_id: str) -> float:
    """When the worker stored the result, from the result itself (both write Celery's
    `date_done`)."""
    raw = sink.client().get(f"celery-task-meta-{task_id}")
    assert raw is not None
    return datetime.fromisoformat(json.loads(raw)["date_done"]).timestamp()


def test_a_countdown_runs_on_the_other_librarys_worker_after_its_eta(
    direction: Direction,
) -> None:
    queue = direction.worker_queue
    sent_at = time.time()
    result = direction.producer.task("add").apply_async((20, 22), countdown=COUNTDOWN)
    assert result.get(timeout=WAIT) == 42
    assert done_at(result.id) >= sent_at + COUNTDOWN - 0.05
    # nothing of it waits where the other side's worker would never look
    assert not sink.client().exists(f"millpond:delayed:{queue}")
    assert wait_until(lambda: direction.reader.result(result.id).state == "SUCCESS", WAIT, "read")


def test_many_countdowns_sent_at_once_each_run_once(direction: Direction) -> None:
    """Many delayed tasks at once, sent before any is due: each runs exactly once."""
    add = direction.producer.task("add")
    results = [add.apply_async((i, i), countdown=COUNTDOWN) for i in range(20)]
    assert [r.get(timeout=WAIT) for r in results] == [2 * i for i in range(20)]
