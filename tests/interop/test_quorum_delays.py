"""Countdowns on RabbitMQ quorum queues, through Celery's native delayed delivery (the shared
`celery_delayed_*` levels), in every direction: a millpond producer to a millpond worker, a Celery
5.7 producer to a millpond worker, and a millpond producer to a Celery 5.7 worker. Each task runs
once, after its countdown and not long after it. Both workers are subprocesses on queues of their
own, declared as Celery's docs ask for native delayed delivery (quorum, topic exchange); millpond
is told so with `queue_type=quorum&exchange_type=topic`."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.interop.conftest import AMQP, REDIS, WAIT, Worker, _delete_queues, wait_until
from tests.interop.test_delays import done_at

pytestmark = [pytest.mark.amqp, pytest.mark.redis, pytest.mark.e2e, pytest.mark.slow]

COUNTDOWN = 2
#: millpond's options for queues shaped like the Celery side's
QUORUM_URL = f"{AMQP}?queue_type=quorum&exchange_type=topic"
#: a countdown that runs later than this after its eta was not held by the delay levels
LATE = 20.0


@dataclass
class Quorum:
    millpond_queue: str
    celery_queue: str
    millpond: Any  # a millpond producer
    celery: Any  # a Celery producer
    workers: dict[str, Worker]

    def logs(self) -> str:
        return "\n".join(f"--- {n} worker ---\n{w.text()[-6000:]}" for n, w in self.workers.items())

    def check_alive(self) -> None:
        for worker in self.workers.values():
            worker.check_alive()


@pytest.fixture(scope="module")
def quorum(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Quorum]:
    from tests.interop.celery_quorum_app import make_quorum_app
    from tests.interop.millpond_app import make_app

    tag = uuid.uuid4().hex[:10]
    mq, cq = f"interop-{tag}-quorum-millpond", f"interop-{tag}-quorum-celery"
    logs = tmp_path_factory.mktemp("interop-quorum")
    workers: dict[str, Worker] = {}
    closers: list[Any] = []
    try:
        workers["millpond"] = Worker(
            "millpond",
            [sys.executable, "-m", "millpond", "worker", "--no-banner",
             "-A", "tests.interop.millpond_app:app", "-P", "threads", "-c", "2"],
            {
                "MILLPOND_BROKER_URL": QUORUM_URL,
                "MILLPOND_RESULT_BACKEND": REDIS,
                "MILLPOND_QUEUES": mq,
                "MILLPOND_DEFAULT_QUEUE": mq,
            },
            logs / "millpond.log",
        )  # fmt: skip
        workers["celery"] = Worker(
            "celery",
            [sys.executable, "-m", "celery", "-A", "tests.interop.celery_quorum_app", "worker",
             "-P", "threads", "-c", "2", "-Q", cq, "-n", f"quorum-{tag}@%h", "--without-mingle",
             "--without-gossip", "--without-heartbeat", "-l", "INFO"],
            {"INTEROP_BROKER": AMQP, "INTEROP_BACKEND": REDIS, "INTEROP_QUEUE": cq},
            logs / "celery.log",
        )  # fmt: skip
        millpond = make_app(broker_url=QUORUM_URL, result_backend=REDIS, default_queue=mq)
        closers.append(millpond.close)
        celery = make_quorum_app(AMQP, REDIS, mq, [cq])
        closers.append(celery.close)
        found = Quorum(mq, cq, millpond, celery, workers)
        for queue in (mq, cq):  # both workers consume (and bound their queues) before a test
            handle = millpond.tasks["interop.add"].apply_async((1, 1), queue=queue)
            wait_until(
                lambda h=handle: found.check_alive() or h.ready(),
                WAIT,
                lambda q=queue: f"an answer on {q}\n{found.logs()}",
            )
            assert handle.get(timeout=WAIT) == 2
        yield found
    finally:
        for close in closers:
            close()
        for worker in workers.values():
            worker.stop()
        _delete_queues("amqp", [mq, cq])


def _runs_after_its_countdown(quorum: Quorum, result: Any, sent_at: float) -> None:
    wait_until(
        lambda: quorum.check_alive() or result.ready(),
        WAIT,
        lambda: f"the delayed task {result.id}\n{quorum.logs()}",
    )
    assert result.get(timeout=WAIT) == 42
    ran = done_at(result.id)
    assert ran >= sent_at + COUNTDOWN - 0.05, f"ran {sent_at + COUNTDOWN - ran:.2f} s early"
    assert ran < sent_at + COUNTDOWN + LATE, f"ran {ran - sent_at:.1f} s after it was sent"


def test_millpond_to_a_millpond_worker(quorum: Quorum) -> None:
    sent_at = time.time()
    add = quorum.millpond.tasks["interop.add"]
    result = add.apply_async((20, 22), countdown=COUNTDOWN, queue=quorum.millpond_queue)
    _runs_after_its_countdown(quorum, result, sent_at)


def test_celery_to_a_millpond_worker(quorum: Quorum) -> None:
    sent_at = time.time()
    add = quorum.celery.tasks["interop.add"]
    result = add.apply_async((20, 22), countdown=COUNTDOWN, queue=quorum.millpond_queue)
    _runs_after_its_countdown(quorum, result, sent_at)


def test_millpond_to_a_celery_worker(quorum: Quorum) -> None:
    sent_at = time.time()
    add = quorum.millpond.tasks["interop.add"]
    result = add.apply_async((20, 22), countdown=COUNTDOWN, queue=quorum.celery_queue)
    _runs_after_its_countdown(quorum, result, sent_at)


def test_many_countdowns_at_once_each_run_once(quorum: Quorum) -> None:
    """Sent together from both producers to both workers (a millpond group is one batch
    publish): each runs once."""
    from millpond import group

    sent_at = time.time()
    results = [
        quorum.millpond.tasks["interop.add"].s(i, i).set(queue=q, countdown=COUNTDOWN)
        for q in (quorum.millpond_queue, quorum.celery_queue)
        for i in range(5)
    ]
    batch = group(results).apply_async()
    handles = list(batch.results) + [
        quorum.celery.tasks["interop.add"].apply_async((i, i), countdown=COUNTDOWN, queue=q)
        for q in (quorum.millpond_queue, quorum.celery_queue)
        for i in range(5)
    ]
    assert [h.get(timeout=WAIT) for h in handles] == [2 * i for i in range(5)] * 4
    assert min(done_at(h.id) for h in handles) >= sent_at + COUNTDOWN - 0.05
