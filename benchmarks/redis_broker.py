"""Drain rate of the Redis broker's consumer against the two baselines, on the same Redis, same run.

    .venv/bin/python benchmarks/redis_broker.py [--messages 5000] [--rounds 3] [--url redis://...]

Each round fills a fresh queue with N protocol-v2 task messages, then drains it three ways
(interleaved, so machine noise hits all three alike), and the median per method is printed:

* millpond: `consumer.fetch(max_count=64)` then one batched `ack` per batch (envelopes decoded);
* redis-py: a bare `BRPOP` loop (no reservation, no ack: the floor of any safe consumer's cost);
* kombu: `Connection.SimpleQueue(...).get()` + `message.ack()` per message (what Celery does).

Also printed: publish rate (one LPUSH per message) for millpond's `publish`.
Compare ratios from the same run only (see the project's PERFORMANCE.md notes on noise).
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable

import redis
from kombu.connection import Connection

from millpond.wire import envelope
from millpond.wire.protocol import encode_task
from millpond_broker_redis import RedisBroker


def fill(client: redis.Redis, queue: str, n: int) -> None:
    payloads = [envelope.dumps(encode_task("bench.noop", (i,)), queue=queue) for i in range(n)]
    with client.pipeline(transaction=False) as pipe:
        for p in payloads:
            pipe.lpush(queue, p)
        pipe.execute()


def drain_millpond(broker: RedisBroker, queue: str, n: int) -> float:
    consumer = broker.consumer([queue], prefetch=64)
    try:
        got = 0
        start = time.perf_counter()
        while got < n:
            batch = consumer.fetch(64, 1.0)
            if not batch:
                raise RuntimeError(f"millpond drained only {got} of {n}")
            consumer.ack(batch)
            got += len(batch)
        return n / (time.perf_counter() - start)
    finally:
        consumer.close()


def drain_brpop(client: redis.Redis, queue: str, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        item = client.brpop([queue], timeout=1)
        if item is None:
            raise RuntimeError("BRPOP ran dry")
        envelope.loads(item[1])
    return n / (time.perf_counter() - start)


def drain_kombu(url: str, queue: str, n: int) -> float:
    with Connection(url) as conn:
        q = conn.SimpleQueue(queue)
        try:
            start = time.perf_counter()
            for _ in range(n):
                msg = q.get(block=True, timeout=1)
                msg.ack()
            return n / (time.perf_counter() - start)
        finally:
            q.close()


def publish_rate(broker: RedisBroker, queue: str, n: int) -> float:
    messages = [encode_task("bench.noop", (i,)) for i in range(n)]
    start = time.perf_counter()
    for m in messages:
        broker.publish(queue, m)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    n = args.messages
    client = redis.Redis.from_url(args.url)
    broker = RedisBroker(args.url)
    results: dict[str, list[float]] = {"millpond": [], "redis-py BRPOP": [], "kombu": []}
    publish: list[float] = []
    runs: list[tuple[str, Callable[[str], float]]] = [
        ("millpond", lambda q: drain_millpond(broker, q, n)),
        ("redis-py BRPOP", lambda q: drain_brpop(client, q, n)),
        ("kombu", lambda q: drain_kombu(args.url, q, n)),
    ]
    try:
        for _ in range(args.rounds):
            for name, run in runs:
                queue = f"bench-{uuid.uuid4().hex[:8]}"
                fill(client, queue, n)
                try:
                    results[name].append(run(queue))
                finally:  # kombu also leaves its binding tables behind
                    client.delete(
                        queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"
                    )
            queue = f"bench-{uuid.uuid4().hex[:8]}"
            try:
                publish.append(publish_rate(broker, queue, n))
            finally:
                client.delete(queue)
    finally:
        broker.close()
    print(f"drain of {n} messages, median of {args.rounds} rounds (messages/s):")
    for name, rates in results.items():
        shown = ", ".join(f"{r:,.0f}" for r in rates)
        print(f"  {name:<16} {statistics.median(rates):>10,.0f}   ({shown})")
    base = statistics.median(results["redis-py BRPOP"])
    mine = statistics.median(results["millpond"])
    kombu = statistics.median(results["kombu"])
    print(f"  millpond / BRPOP = {mine / base:.2f}x, millpond / kombu = {mine / kombu:.2f}x")
    print(f"publish (one LPUSH each): {statistics.median(publish):,.0f} messages/s")


if __name__ == "__main__":
    main()
