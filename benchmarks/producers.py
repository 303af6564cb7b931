"""Each framework's own producer: millpond's `app.send_task`, Celery's `celery_app.send_task`,
Dramatiq's `broker.enqueue`.

A fresh app per run, pointed at the run's broker and queue and closed afterwards, so no connection
or setting leaks from one run into the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from benchmarks.model import CELERY, DRAMATIQ, MILLPOND


class Producer(Protocol):
    def send(self, name: str, args: Sequence[Any] = ()) -> None: ...

    def close(self) -> None: ...


class MillpondProducer:
    def __init__(self, broker_url: str, queue: str) -> None:
        from millpond.produce.app import Millpond

        self.queue = queue
        self.app = Millpond(
            "bench-producer", broker_url=broker_url, default_queue=queue, ignore_result=True
        )
        # A worker declares its queues when it starts; this one is not running yet, and a broker
        # that routes (RabbitMQ) drops what is published to a queue nobody declared.
        self.app.broker.declare([queue])

    def send(self, name: str, args: Sequence[Any] = ()) -> None:
        self.app.send_task(name, args, queue=self.queue)

    def close(self) -> None:
        self.app.close()


class CeleryProducer:
    def __init__(
        self, broker_url: str, queue: str, transport_options: dict[str, Any] | None = None
    ) -> None:
        from celery import Celery

        self.queue = queue
        self.app = Celery("bench-producer", broker=broker_url)
        self.app.conf.update(
            task_ignore_result=True,
            broker_connection_retry_on_startup=True,
            broker_transport_options=transport_options or {},
        )
        from benchmarks.tasks import celery_cluster_options

        self.app.conf.update(celery_cluster_options())

    def send(self, name: str, args: Sequence[Any] = ()) -> None:
        self.app.send_task(name, args=list(args), queue=self.queue, ignore_result=True)

    def close(self) -> None:
        self.app.close()


class DramatiqProducer:
    """`broker.enqueue` of a Dramatiq message, what `actor.send` does minus the actor lookup
    (the harness does not declare the worker's actors, whose queue is the run's)."""

    def __init__(self, broker_url: str, queue: str) -> None:
        from benchmarks.dramatiq_tasks import make_broker

        self.queue = queue
        self.broker = make_broker(broker_url)
        self.broker.declare_queue(queue)

    def send(self, name: str, args: Sequence[Any] = ()) -> None:
        from dramatiq import Message

        self.broker.enqueue(
            Message(queue_name=self.queue, actor_name=name, args=tuple(args), kwargs={}, options={})
        )

    def close(self) -> None:
        self.broker.close()


def producer(
    framework: str,
    broker_url: str,
    transport_options: dict[str, Any] | None = None,
    *,
    queue: str,
) -> Producer:
    if framework == MILLPOND:
        return MillpondProducer(broker_url, queue)
    if framework == CELERY:
        return CeleryProducer(broker_url, queue, transport_options)
    if framework == DRAMATIQ:
        return DramatiqProducer(broker_url, queue)
    raise ValueError(f"unknown framework {framework!r}")
