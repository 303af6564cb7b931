"""Drain rate of the RabbitMQ broker's consumer against a bare kombu loop, same server, same run.

    .venv/bin/python benchmarks/amqp_broker.py [--messages 5000] [--rounds 3] [--url amqp://...]

Each round fills a fresh queue with N protocol-v2 task messages (published raw, without
confirms, so filling is not what is measured), then drains it each way, interleaved so machine
noise hits all of them alike; the median per method is printed:

* millpond: `consumer.fetch(max_count=64)` then one batched `ack` per batch, prefetch 64;
* millpond+decode: the same plus `decode_task` of every message (what the worker adds first);
* millpond ack each: one `ack([delivery])` call (one write, one frame) per message instead of one
  `multiple` ack per batch;
* kombu: `kombu.Consumer` with prefetch_count=64, `message.ack()` per message in the callback
  (the "kombu consume+ack, prefetch 64" line of PERFORMANCE.md; Celery's consumer is this plus
  more);
* py-amqp: py-amqp's own consume loop with one ack per message (the library under kombu).

Also printed: millpond's confirmed `publish` rate from one thread. Compare ratios from the same
run only (see the project's PERFORMANCE.md notes on noise).
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable

import amqp
from kombu.connection import Connection
from kombu.entity import Queue
from kombu.messaging import Consumer

from millpond.wire.protocol import decode_task, encode_task
from millpond_broker_amqp import AmqpBroker
from millpond_broker_amqp.codec import to_amqp

PREFETCH = 64


def _raw(url: str) -> amqp.Connection:
    broker = AmqpBroker(url)
    s = broker.settings
    conn = amqp.Connection(
        f"{s.host}:{s.port}", userid=s.userid, password=s.password, virtual_host=s.virtual_host
    )
    conn.connect()
    return conn


def fill(url: str, queue: str, n: int) -> None:
    conn = _raw(url)
    try:
        chan = conn.channel()
        chan.queue_declare(queue, durable=True, auto_delete=False)
        for i in range(n):
            chan.basic_publish(to_amqp(encode_task("bench.noop", (i,))), "", queue)
        deadline = time.monotonic() + 60
        while chan.queue_declare(queue, passive=True).message_count < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"queue {queue} did not fill up to {n}")
            time.sleep(0.01)
    finally:
        conn.close()


def delete(url: str, queue: str) -> None:
    conn = _raw(url)
    try:
        chan = conn.channel()
        for name in (queue, f"{queue}.dead"):
            chan.queue_delete(name)
        chan.exchange_delete(queue)
    finally:
        conn.close()


def drain_millpond(
    url: str, queue: str, n: int, decode: bool = False, ack_each: bool = False
) -> float:
    broker = AmqpBroker(url)
    consumer = broker.consumer([queue], prefetch=PREFETCH)
    try:
        got = 0
        start = time.perf_counter()
        while got < n:
            batch = consumer.fetch(PREFETCH, 5.0)
            if not batch:
                raise RuntimeError(f"millpond drained only {got} of {n}")
            if decode:
                for delivery in batch:
                    decode_task(delivery.message)
            if ack_each:
                for delivery in batch:
                    consumer.ack([delivery])
            else:
                consumer.ack(batch)
            got += len(batch)
        return n / (time.perf_counter() - start)
    finally:
        consumer.close()
        broker.close()


def drain_kombu(url: str, queue: str, n: int) -> float:
    count = 0

    def on_message(body: object, message: object) -> None:
        nonlocal count
        count += 1
        message.ack()  # type: ignore[attr-defined]

    with Connection(url) as conn:
        consumer = Consumer(
            conn,
            [Queue(queue, durable=True)],
            callbacks=[on_message],
            accept=["json"],
            prefetch_count=PREFETCH,
        )
        with consumer:
            start = time.perf_counter()
            while count < n:
                conn.drain_events(timeout=5)
            return n / (time.perf_counter() - start)


def drain_pyamqp(url: str, queue: str, n: int) -> float:
    conn = _raw(url)
    try:
        chan = conn.channel()
        chan.basic_qos(0, PREFETCH, False)
        count = 0

        def on_message(message: amqp.Message) -> None:
            nonlocal count
            count += 1
            chan.basic_ack(message.delivery_tag)

        chan.basic_consume(queue, callback=on_message)
        start = time.perf_counter()
        while count < n:
            conn.drain_events(timeout=5)
        return n / (time.perf_counter() - start)
    finally:
        conn.close()


def publish_rate(url: str, n: int) -> float:
    broker = AmqpBroker(url)
    queue = f"bench-amqp-{uuid.uuid4().hex[:10]}"
    try:
        broker.declare([queue])
        message = encode_task("bench.noop", (1,))
        start = time.perf_counter()
        for _ in range(n):
            broker.publish(queue, message)
        return n / (time.perf_counter() - start)
    finally:
        broker.close()
        delete(url, queue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672//")
    args = parser.parse_args()

    methods: dict[str, Callable[[str, str, int], float]] = {
        "millpond": drain_millpond,
        "millpond+decode": lambda u, q, n: drain_millpond(u, q, n, decode=True),
        "millpond ack each": lambda u, q, n: drain_millpond(u, q, n, ack_each=True),
        "kombu": drain_kombu,
        "py-amqp": drain_pyamqp,
    }
    rates: dict[str, list[float]] = {name: [] for name in methods}
    for round_no in range(args.rounds):
        for name, drain in methods.items():
            queue = f"bench-amqp-{uuid.uuid4().hex[:10]}"
            try:
                fill(args.url, queue, args.messages)
                rates[name].append(drain(args.url, queue, args.messages))
            finally:
                delete(args.url, queue)
        line = ", ".join(f"{name} {r[-1]:,.0f}" for name, r in rates.items())
        print(f"round {round_no + 1}: {line} msg/s", flush=True)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    print(f"\nmedian drain rate of {args.messages:,} messages, prefetch {PREFETCH}:")
    for name, rate in medians.items():
        print(f"  {name:18s} {rate:9,.0f} msg/s   ({rate / medians['kombu']:.2f}x kombu)")
    print(f"\nconfirmed publish, one thread: {publish_rate(args.url, 2000):,.0f} msg/s")


if __name__ == "__main__":
    main()
