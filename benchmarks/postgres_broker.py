"""The Postgres broker against the Redis broker, interleaved in one run: the NOTIFY wake-up path.

    .venv/bin/python benchmarks/postgres_broker.py [--probes 300] [--messages 5000] [--rounds 3]

The whole-worker comparison (no-op drain through `millpond worker`, idle-worker latency) is
`dev.py bench --broker redis,postgres --framework millpond`; this script isolates the broker:

* latency: an idle consumer in another process blocks in `fetch`; the producer publishes one
  message, the consumer prints when `fetch` returned it; p50/p90/p99 of (returned - published),
  probes a few milliseconds apart so the consumer is idle (waiting on LISTEN, or on BLMOVE) each
  time. This is the path the target "p50 under 2 ms through NOTIFY" is about.
* publish: messages/s of single `publish` calls (one INSERT, one LPUSH each) and of `publish_many`
  in batches of 100.
* drain: messages/s of `fetch(64)` + one `ack` per batch over a queue of N messages.
* CPU: the client process's CPU time per message, publishing (one by one) and draining: what
  the broker plugin costs the worker and the producer (the server's own CPU is not counted).

PostgreSQL is a private server (initdb in a temporary directory, free port, stopped at the end)
unless $BENCH_POSTGRES_URL names one; Redis is the one on 127.0.0.1:6379 (database 0, a unique
queue per round, deleted afterwards). Rounds alternate the brokers so noise hits both alike;
medians per broker are printed, as markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from millpond.config import plugins
from millpond.contracts.broker import Broker, Outbound
from millpond.wire.protocol import encode_task

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = "redis://127.0.0.1:6379/0"

CONSUMER = r"""
import json, sys, time
from millpond.config import plugins
url, queue = sys.argv[1], sys.argv[2]
broker = plugins.broker_for_url(url)
consumer = broker.consumer([queue], 16)
print("ready", flush=True)
while True:
    got = consumer.fetch(16, 1.0)
    now = time.time()
    for d in got:
        if d.message.task_id == "stop":
            consumer.ack(got)
            consumer.close()
            broker.close()
            sys.exit(0)
        print(json.dumps([d.message.task_id, now]), flush=True)
    if got:
        consumer.ack(got)
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency(url: str, probes: int) -> list[float]:
    """Milliseconds from publish to the consumer process's fetch returning the message."""
    queue = f"bench-pg-lat-{uuid.uuid4().hex[:10]}"
    broker = plugins.broker_for_url(url)
    broker.declare([queue])
    proc = subprocess.Popen(
        [sys.executable, "-c", CONSUMER, url, queue],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the consumer process did not start")
        out: list[float] = []
        for _ in range(probes):
            time.sleep(0.004)  # let the consumer go idle again (waiting, not busy)
            task_id = str(uuid.uuid4())
            sent = time.time()
            broker.publish(queue, encode_task("bench.noop", (), task_id=task_id))
            got_id, at = json.loads(proc.stdout.readline())
            if got_id != task_id:
                raise RuntimeError(f"expected {task_id}, the consumer got {got_id}")
            out.append((at - sent) * 1000)
        broker.publish(queue, encode_task("bench.noop", (), task_id="stop"))
        proc.wait(30)
        return out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cleanup(broker, queue)


def cleanup(broker: Broker, queue: str) -> None:
    try:
        broker.purge(queue)
    finally:
        broker.close()


def rate(fn: Callable[[], int]) -> tuple[float, float]:
    """(messages/s, client CPU µs per message) of `fn`, which returns how many it handled."""
    start, cpu = time.perf_counter(), time.process_time()
    n = fn()
    return n / (time.perf_counter() - start), (time.process_time() - cpu) / n * 1e6


def publish_and_drain(url: str, n: int) -> dict[str, float]:
    queue = f"bench-pg-{uuid.uuid4().hex[:10]}"
    broker = plugins.broker_for_url(url)
    broker.declare([queue])
    try:
        messages = [encode_task("bench.noop", (i,)) for i in range(n)]

        def one_by_one() -> int:
            for m in messages:
                broker.publish(queue, m)
            return n

        def batched() -> int:
            for i in range(0, n, 100):
                broker.publish_many([Outbound(queue, m) for m in messages[i : i + 100]])
            return n

        def drain() -> int:
            consumer = broker.consumer([queue], 64)
            got = 0
            try:
                while got < 2 * n:
                    batch = consumer.fetch(64, 1.0)
                    if not batch:
                        raise RuntimeError(f"drained only {got} of {2 * n}")
                    consumer.ack(batch)
                    got += len(batch)
            finally:
                consumer.close()
            return got

        publish, publish_cpu = rate(one_by_one)
        many, _ = rate(batched)
        drained, drain_cpu = rate(drain)
        return {
            "publish": publish,
            "publish_many": many,
            "drain": drained,
            "publish_cpu_us": publish_cpu,
            "drain_cpu_us": drain_cpu,
        }
    finally:
        cleanup(broker, queue)


def private_postgres() -> tuple[str, Any]:
    from millpond.testing.servers import PostgresServer

    server = PostgresServer().start()
    return server.url, server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--probes", type=int, default=300, help="latency probes per round")
    p.add_argument("--messages", type=int, default=5000, help="messages per publish/drain round")
    p.add_argument("--rounds", type=int, default=3)
    ns = p.parse_args(argv)
    server = None
    pg_url = os.environ.get("BENCH_POSTGRES_URL")
    if not pg_url:
        pg_url, server = private_postgres()
    urls = {"redis": REDIS_URL, "postgres": pg_url}
    found: dict[str, dict[str, list[float]]] = {name: {} for name in urls}
    try:
        for round_no in range(ns.rounds):
            order = list(urls) if round_no % 2 == 0 else list(reversed(urls))
            for name in order:
                lat = latency(urls[name], ns.probes)
                rates = publish_and_drain(urls[name], ns.messages)
                row = found[name]
                for key, value in (
                    ("p50", pct(lat, 0.5)),
                    ("p90", pct(lat, 0.9)),
                    ("p99", pct(lat, 0.99)),
                    *rates.items(),
                ):
                    row.setdefault(key, []).append(value)
                print(
                    f"round {round_no + 1} {name}: latency p50 {pct(lat, 0.5):.2f} ms, "
                    + ", ".join(f"{k} {v:,.0f}" for k, v in rates.items()),
                    file=sys.stderr,
                )
    finally:
        if server is not None:
            server.stop()
    print(
        f"Medians of {ns.rounds} interleaved rounds ({ns.probes} probes, {ns.messages} messages):"
    )
    print()
    print("| broker | publish->fetch p50 ms | p90 ms | p99 ms | publish/s | publish_many/s "
          "| fetch+ack/s | CPU µs/publish | CPU µs/fetch+ack |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in found.items():
        m = {k: statistics.median(v) for k, v in row.items()}
        print(
            f"| {name} | {m['p50']:.2f} | {m['p90']:.2f} | {m['p99']:.2f} | {m['publish']:,.0f} "
            f"| {m['publish_many']:,.0f} | {m['drain']:,.0f} | {m['publish_cpu_us']:.0f} "
            f"| {m['drain_cpu_us']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
