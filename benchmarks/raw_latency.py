"""The no-framework floor of idle-worker latency: a bare consumer in its own process.

    python benchmarks/raw_latency.py URL QUEUE      # the consumer (the harness starts it)

The harness sends `[key, time.time()]` as JSON one message at a time, like the latency probes of
the frameworks; the consumer decodes it and pushes (now - sent) to the side channel, as
`bench.latency` does. On Redis it is a redis-py BRPOP loop (no reservation, no ack), on RabbitMQ a
py-amqp `basic_consume` with prefetch 1 and an ack per message: the least any consumer of that
broker does, so the frameworks' figures above it are their own cost.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

if __name__ == "__main__":  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.model import Record, RunFailed

FRAMEWORK = "raw"
BROKERS = ("redis", "amqp")


def _amqp_connection(url: str) -> Any:
    import amqp

    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    conn = amqp.Connection(
        host=f"{parts.hostname or '127.0.0.1'}:{parts.port or 5672}",
        userid=parts.username or "guest",
        password=parts.password or "guest",
        virtual_host=vhost or "/",
    )
    conn.connect()
    return conn


def _report(body: bytes | str) -> None:
    from benchmarks.tasks import side

    key, sent_at = json.loads(body)
    started = time.time()
    side().rpush(key, repr(started - sent_at))


def consume(url: str, queue: str) -> None:
    """Consume until killed."""
    if url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(url)
        while True:
            item = client.brpop([queue], timeout=1)
            if item is not None:
                _report(item[1])
    conn = _amqp_connection(url)
    channel = conn.channel()
    channel.queue_declare(queue, durable=False, auto_delete=False)
    channel.basic_qos(0, 1, False)

    def on_message(message: Any) -> None:
        _report(message.body)
        channel.basic_ack(message.delivery_tag)

    channel.basic_consume(queue, callback=on_message)
    while True:
        conn.drain_events()


class _Sender:
    def __init__(self, url: str, queue: str) -> None:
        self.url, self.queue = url, queue
        if url.startswith("redis"):
            import redis

            self.client: Any = redis.Redis.from_url(url)
        else:
            self.client = _amqp_connection(url)
            self.channel = self.client.channel()
            self.channel.queue_declare(queue, durable=False, auto_delete=False)

    def send(self, key: str) -> None:
        body = json.dumps([key, time.time()])
        if self.url.startswith("redis"):
            self.client.lpush(self.queue, body)
        else:
            import amqp

            self.channel.basic_publish(amqp.Message(body), routing_key=self.queue)

    def close(self) -> None:
        try:
            if self.url.startswith("redis"):
                self.client.delete(self.queue)
            else:
                self.channel.queue_delete(self.queue)
        finally:
            self.client.close()


def raw_latency(ctx: Any, target: Any, repeat: int, samples: int) -> Record:
    """`samples` sequential probes through the bare consumer; the record's value is the p50."""
    from benchmarks.scenarios import latency_figures
    from benchmarks.workers import WorkerProcess, environment

    base: dict[str, Any] = {
        "scenario": "latency",
        "broker": target.name,
        "pool": "solo",
        "concurrency": 1,
        "framework": FRAMEWORK,
        "repeat": repeat,
        "unit": "ms",
    }
    queue = f"bench-raw-{uuid.uuid4().hex[:10]}"
    worker: WorkerProcess | None = None
    sender: _Sender | None = None
    try:
        sender = _Sender(target.url, queue)  # declares the queue before the consumer starts
        env = environment("celery", target.url, ctx.side.url, ctx.run_dir)
        argv = [sys.executable, str(Path(__file__).resolve()), target.url, queue]
        worker = WorkerProcess(argv, env, ctx.run_dir / f"latency-raw-{target.name}-{queue}.log")
        deadline = time.monotonic() + ctx.timeout
        key = ctx.side.key("raw-latency")
        sender.send(key)  # warm-up: the consumer's start-up and connections
        ctx.side.wait(key, deadline, worker.problem, "the raw consumer's warm-up probe")
        values = []
        for i in range(samples):
            sender.send(key)
            values.append(
                ctx.side.wait(key, deadline, worker.problem, f"raw probe {i + 1} of {samples}")
                * 1000.0
            )
        figures = latency_figures(values)
        return Record(**base, ok=True, value=figures.pop("p50_ms"), metrics=figures)
    except Exception as exc:
        error = str(exc) if isinstance(exc, RunFailed) else f"{type(exc).__name__}: {exc}"
        tail = worker.tail() if worker is not None else None
        return Record(**base, ok=False, error=error, output_tail=tail)
    finally:
        if worker is not None:
            worker.stop(ctx.grace)
        if sender is not None:
            try:
                sender.close()
            except Exception:
                pass


if __name__ == "__main__":
    consume(sys.argv[1], sys.argv[2])
