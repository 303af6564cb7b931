"""The benchmark tasks as Dramatiq actors, and the Dramatiq side of the harness's broker work.

    BENCH_BROKER_URL=redis://127.0.0.1:6379/13 BENCH_DRAMATIQ_QUEUE=q \
        dramatiq benchmarks.dramatiq_tasks -Q q --processes 1 --threads 1

The bodies are `benchmarks.tasks.BODIES`, the ones millpond and Celery run, under the same names.
A Dramatiq actor belongs to one queue when it is declared and the worker consumes only the queues
its actors declared, so the worker learns the run's queue from `BENCH_DRAMATIQ_QUEUE` and the
module declares every actor on it. Retries are off (`max_retries=0`), like the other two apps,
whose benchmark tasks never retry either; everything else is Dramatiq's default middleware.

Importing this module sets Dramatiq's global broker, so only the worker imports it; the harness
uses `make_broker` (its producer) and `depth`/`cleanup`, which build brokers of their own and
import nothing at module level.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks.tasks import BODIES, BROKER_URL_ENV

QUEUE_ENV = "BENCH_DRAMATIQ_QUEUE"
#: Redis keys of a Dramatiq queue live under this prefix (the broker's default namespace)
NAMESPACE = "dramatiq"


def make_broker(url: str) -> Any:
    """A Dramatiq broker for a harness broker URL: Redis or RabbitMQ, the two it ships."""
    if url.startswith(("redis://", "rediss://")):
        from dramatiq.brokers.redis import RedisBroker

        return RedisBroker(url=url)
    if url.startswith(("amqp://", "amqps://")):
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        return RabbitmqBroker(url=pika_url(url))
    raise ValueError(f"Dramatiq has no broker for {url!r}; it ships Redis and RabbitMQ brokers")


def pika_url(url: str) -> str:
    """kombu's `amqp://host//` (vhost "/") as pika reads it: pika takes `//` for the vhost ""."""
    head, sep, vhost = url.partition("@")
    rest = vhost if sep else head
    host, slash, path = rest.partition("/")
    if slash and path in ("", "/"):
        rest = f"{host}/%2F"
    return f"{head}{sep}{rest}" if sep else rest


def amqp_queues(queue: str) -> tuple[str, str, str]:
    """What Dramatiq's RabbitMQ broker declares for one queue: it, its delay and dead queues."""
    return queue, f"{queue}.DQ", f"{queue}.XQ"


def depth(url: str, queue: str) -> int:
    """Messages of `queue` not yet acknowledged (Redis keeps their bodies in `<queue>.msgs`)."""
    if url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(url)
        try:
            return int(client.hlen(f"{NAMESPACE}:{queue}.msgs"))
        finally:
            client.close()
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(pika_url(url)))
    try:
        frame = conn.channel().queue_declare(queue=queue, passive=True)
        return int(frame.method.message_count)
    finally:
        conn.close()


def cleanup(url: str, queue: str) -> None:
    """Delete the queues Dramatiq declared on RabbitMQ (Redis keys go with the harness's
    `*<queue>*` sweep); errors are the caller's to ignore."""
    if not url.startswith("amqp"):
        return
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(pika_url(url)))
    try:
        channel = conn.channel()
        for name in amqp_queues(queue):
            channel.queue_delete(queue=name)
    finally:
        conn.close()


def _declare() -> Any:
    import dramatiq

    broker = make_broker(os.environ.get(BROKER_URL_ENV, "redis://127.0.0.1:6379/13"))
    dramatiq.set_broker(broker)
    queue = os.environ.get(QUEUE_ENV, "bench")
    for name, fn in BODIES.items():
        dramatiq.actor(actor_name=name, queue_name=queue, max_retries=0)(fn)
    return broker


if os.environ.get(QUEUE_ENV):  # the worker; the harness imports the helpers above only
    broker = _declare()
