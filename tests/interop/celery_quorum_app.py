"""The Celery side on a quorum queue: `celery_app`'s tasks, with its queue (INTEROP_QUEUE) declared
the way Celery's docs ask for native delayed delivery: `x-queue-type: quorum` and a topic exchange
of the queue's name. Celery's worker then declares the `celery_delayed_*` levels and binds the
queue for their last hop; its producer sends countdowns through them."""

from __future__ import annotations

import os
from collections.abc import Iterable

from celery import Celery
from kombu import Exchange, Queue

from tests.interop.celery_app import make_app


def quorum_queues(names: Iterable[str]) -> list[Queue]:
    """Celery queues as millpond declares them with queue_type=quorum, exchange_type=topic."""
    return [
        Queue(name, Exchange(name, type="topic"), name, queue_arguments={"x-queue-type": "quorum"})
        for name in names
    ]


def make_quorum_app(broker: str, backend: str, queue: str, others: Iterable[str] = ()) -> Celery:
    app = make_app(broker, backend, queue)
    app.conf.task_queues = quorum_queues([queue, *others])
    return app


#: the worker's app
app = make_quorum_app(
    os.environ.get("INTEROP_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    os.environ.get("INTEROP_BACKEND", "redis://127.0.0.1:6379/0"),
    os.environ.get("INTEROP_QUEUE", "celery"),
)
