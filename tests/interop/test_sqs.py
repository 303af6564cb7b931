"""Celery 5.7 and millpond sharing SQS queues (a moto server): a Celery producer feeds a millpond
worker and a millpond producer feeds a Celery worker, plain calls, countdowns and failures, both
reading the results from Redis. The bytes on the queue are kombu's on both sides."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.interop import sink
from tests.interop.conftest import REDIS, WAIT, Worker, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.slow]

OPTIONS = {"region": "us-east-1", "is_secure": False, "wait_time_seconds": 1}


@dataclass
class SqsPair:
    celery: Any  # a Celery app sending to the millpond worker's queue
    millpond: Any  # a millpond app sending to the Celery worker's queue
    celery_q: str
    millpond_q: str
    workers: dict[str, Worker]

    def alive(self) -> None:
        for worker in self.workers.values():
            worker.check_alive()

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{w.text()[-6000:]}" for n, w in self.workers.items())


@pytest.fixture(scope="module")
def sqs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqsPair]:
    pytest.importorskip("moto", reason="moto is in the dev group: python3 dev.py env")
    from millpond_broker_kombu.testing import MotoServer
    from tests.interop.celery_app import make_app as celery_app
    from tests.interop.millpond_app import make_app as millpond_app

    logs: Path = tmp_path_factory.mktemp("interop-sqs")
    tag = uuid.uuid4().hex[:10]
    celery_q, millpond_q = f"interop-{tag}-celery", f"interop-{tag}-millpond"
    with MotoServer() as moto:
        workers: dict[str, Worker] = {}
        apps: list[Any] = []
        try:
            workers["celery"] = Worker(
                "celery",
                [sys.executable, "-m", "celery", "-A", "tests.interop.celery_app", "worker",
                 "-P", "threads", "-c", "4", "-Q", celery_q, "-n", f"sqs-{tag}@%h",
                 "--without-mingle", "--without-gossip", "--without-heartbeat", "-l", "INFO"],
                {"INTEROP_BROKER": moto.url, "INTEROP_BACKEND": REDIS,
                 "INTEROP_QUEUE": celery_q, "INTEROP_TRANSPORT_OPTIONS": json.dumps(OPTIONS)},
                logs / "celery.log",
            )  # fmt: skip
            workers["millpond"] = Worker(
                "millpond",
                [sys.executable, "-m", "millpond", "worker", "--no-banner", "-A",
                 "tests.interop.millpond_app:app", "-P", "threads", "-c", "4"],
                {"MILLPOND_BROKER_URL": moto.url, "MILLPOND_RESULT_BACKEND": REDIS,
                 "MILLPOND_QUEUES": millpond_q, "MILLPOND_DEFAULT_QUEUE": millpond_q,
                 "MILLPOND_SQS__IS_SECURE": "false", "MILLPOND_SQS__WAIT_TIME_SECONDS": "1"},
                logs / "millpond.log",
            )  # fmt: skip
            celery = celery_app(moto.url, REDIS, millpond_q, OPTIONS)
            apps.append(celery.close)
            millpond = millpond_app(
                broker_url=moto.url, result_backend=REDIS, default_queue=celery_q,
                queues=[celery_q], sqs={"is_secure": False, "wait_time_seconds": 1},
            )  # fmt: skip
            apps.append(millpond.close)
            pair = SqsPair(celery, millpond, celery_q, millpond_q, workers)
            for app in (celery, millpond):
                handle = app.tasks["interop.add"].delay(1, 1)
                wait_until(lambda h=handle: pair.alive() or h.ready(), WAIT,
                           lambda: f"a first answer\n{pair.logs()}")  # fmt: skip
            yield pair
        finally:
            for close in apps:
                close()
            for worker in workers.values():
                worker.stop()


def _done_at(task_id: str) -> float:
    raw = sink.client().get(f"celery-task-meta-{task_id}")
    assert raw is not None
    return datetime.fromisoformat(json.loads(raw)["date_done"]).timestamp()


@pytest.mark.parametrize("producer", ["celery", "millpond"])
def test_a_call_runs_on_the_other_librarys_worker(sqs: SqsPair, producer: str) -> None:
    app = getattr(sqs, producer)
    result = app.tasks["interop.add"].delay(20, 22)
    wait_until(lambda: sqs.alive() or result.ready(), WAIT, lambda: f"the answer\n{sqs.logs()}")
    assert result.get(timeout=5) == 42
    reader = sqs.millpond if producer == "celery" else sqs.celery
    assert reader.AsyncResult(result.id).get(timeout=5) == 42


@pytest.mark.parametrize("producer", ["celery", "millpond"])
def test_a_countdown_runs_after_its_eta(sqs: SqsPair, producer: str) -> None:
    app = getattr(sqs, producer)
    sent = time.time()
    result = app.tasks["interop.add"].apply_async((2, 3), countdown=2)
    wait_until(lambda: sqs.alive() or result.ready(), WAIT, lambda: f"the answer\n{sqs.logs()}")
    assert result.get(timeout=5) == 5
    assert _done_at(result.id) >= sent + 2 - 0.05


@pytest.mark.parametrize("producer", ["celery", "millpond"])
def test_a_failure_reaches_the_producer_as_raised(sqs: SqsPair, producer: str) -> None:
    app = getattr(sqs, producer)
    result = app.tasks["interop.boom"].delay("x")
    wait_until(lambda: sqs.alive() or result.ready(), WAIT, lambda: f"the answer\n{sqs.logs()}")
    with pytest.raises(Exception, match="boom x") as caught:
        result.get(timeout=5)
    assert type(caught.value).__name__ == "ValueError"


def test_many_tasks_from_both_sides_each_run_once(sqs: SqsPair) -> None:
    sent = [sqs.celery.tasks["interop.add"].delay(i, 1) for i in range(30)]
    sent += [sqs.millpond.tasks["interop.add"].delay(i, 2) for i in range(30)]
    for r in sent:
        wait_until(lambda r=r: sqs.alive() or r.ready(), WAIT, lambda: f"answers\n{sqs.logs()}")
    assert [r.get(timeout=5) for r in sent] == [i + 1 for i in range(30)] + [
        i + 2 for i in range(30)
    ]
