"""No-framework floors, measured in the same session so their ratios mean something.

* redis-py: BRPOP + JSON-decode loop over a list of N task envelopes (no reservation, no ack: the
  floor any safe Redis consumer starts from);
* kombu: consume + ack, prefetch 64, over N messages (what Celery is built on);
* millpond consumer: the millpond broker plugin's own `fetch(64)` + batched `ack` loop, no worker,
  no pool: the gap between it and the drain figure is what the worker loop costs.

Each drains a pre-filled fresh queue; filling is not timed.
"""

from __future__ import annotations

import json
import time
import uuid
from functools import partial
from typing import Any

from benchmarks import brokers
from benchmarks.model import Record, RunFailed
from benchmarks.timeouts import bounded

PREFETCH = 64


def _payloads(queue: str, n: int) -> list[bytes]:
    from millpond.wire import envelope
    from millpond.wire.protocol import encode_task

    return [envelope.dumps(encode_task("bench.noop", ()), queue=queue).encode() for _ in range(n)]


def redis_brpop(target: brokers.Target, n: int, timeout: float) -> float:
    import redis

    queue = f"bench-base-{uuid.uuid4().hex[:10]}"
    client = redis.Redis.from_url(target.url)
    try:
        payloads = _payloads(queue, n)
        with client.pipeline(transaction=False) as pipe:
            for body in payloads:
                pipe.lpush(queue, body)
            pipe.execute()
        deadline = time.monotonic() + timeout
        began = time.perf_counter()
        for i in range(n):
            item = client.brpop([queue], timeout=1)
            if item is None or time.monotonic() > deadline:
                raise RunFailed(f"BRPOP drained only {i} of {n} messages")
            json.loads(item[1])
        return n / (time.perf_counter() - began)
    finally:
        client.delete(queue)
        client.close()


def kombu_consume(target: brokers.Target, n: int, timeout: float) -> float:
    k = brokers.kombu()
    name = f"bench-base-{uuid.uuid4().hex[:10]}"
    queue = k.Queue(name, k.Exchange(name, type="direct"), routing_key=name)
    got = 0

    def on_message(body: Any, message: Any) -> None:
        nonlocal got
        message.ack()
        got += 1

    with k.Connection(target.url, connect_timeout=5) as conn:
        channel = conn.channel()
        try:
            producer = k.Producer(channel)
            body = {"task": "bench.noop", "args": [], "kwargs": {}}
            for _ in range(n):
                producer.publish(body, exchange=queue.exchange, routing_key=name, declare=[queue])
            deadline = time.monotonic() + timeout
            consumer = k.Consumer(
                channel, queues=[queue], callbacks=[on_message], prefetch_count=PREFETCH
            )
            with consumer:
                began = time.perf_counter()
                while got < n:
                    if time.monotonic() > deadline:
                        raise RunFailed(f"kombu consumed only {got} of {n} messages")
                    try:
                        conn.drain_events(timeout=1)
                    except TimeoutError:
                        pass
                return n / (time.perf_counter() - began)
        finally:
            brokers.cleanup(target, name)
            try:
                channel.close()
            except Exception:
                pass


def millpond_consumer(target: brokers.Target, n: int, timeout: float) -> float:
    from millpond.config import plugins
    from millpond.wire.protocol import encode_task

    queue = f"bench-base-{uuid.uuid4().hex[:10]}"
    broker = plugins.broker_for_url(target.url)
    try:
        broker.declare([queue])
        for _ in range(n):
            broker.publish(queue, encode_task("bench.noop", ()))
        consumer = broker.consumer([queue], PREFETCH)
        try:
            deadline = time.monotonic() + timeout
            got = 0
            began = time.perf_counter()
            while got < n:
                if time.monotonic() > deadline:
                    raise RunFailed(f"the millpond consumer drained only {got} of {n} messages")
                batch = consumer.fetch(PREFETCH, 1.0)
                if batch:
                    consumer.ack(batch)
                    got += len(batch)
            return n / (time.perf_counter() - began)
        finally:
            consumer.close()
    finally:
        try:
            broker.purge(queue)
        except Exception:
            pass
        broker.close()
        brokers.cleanup(target, queue)


#: which floors apply to which broker
METHODS = {
    "sqlite": {"millpond-consumer": millpond_consumer},
    "redis": {
        "redis-py": redis_brpop,
        "kombu": kombu_consume,
        "millpond-consumer": millpond_consumer,
    },
    "amqp": {"kombu": kombu_consume, "millpond-consumer": millpond_consumer},
    "postgres": {"millpond-consumer": millpond_consumer},
}


def run_baselines(
    target: brokers.Target, repeat: int, n: int, timeout: float, with_millpond: bool = True
) -> list[Record]:
    records = []
    for method, fn in METHODS.get(target.name, {}).items():
        if method == "millpond-consumer" and not with_millpond:
            continue
        base: dict[str, Any] = {
            "scenario": "baseline",
            "broker": target.name,
            "pool": "-",
            "concurrency": 1,
            "framework": method,
            "repeat": repeat,
        }
        try:
            rate = bounded(partial(fn, target, n, timeout), timeout * 2, f"the {method} floor")
            records.append(Record(**base, ok=True, value=rate, metrics={"n": n}))
        except Exception as exc:
            error = str(exc) if isinstance(exc, RunFailed) else f"{type(exc).__name__}: {exc}"
            records.append(Record(**base, ok=False, error=error))
    return records
