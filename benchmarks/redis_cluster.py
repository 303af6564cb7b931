"""Drain rate of one Redis broker consumer serving three queues, on a Redis Cluster whose three
primaries each hold one of them, against the same on one private Redis server, same run.

    .venv/bin/python benchmarks/redis_cluster.py [--messages 6000] [--rounds 3]

Both servers are private (started here on free loopback ports, without persistence, stopped at
the end): a three-primary cluster (`millpond.testing.servers.RedisClusterGroup`) and one plain
redis-server. Each round fills three fresh queues with N/3 protocol-v2 no-op task messages each,
then drains them with one `consumer.fetch(max_count=64)` + one batched `ack` per batch; the two
deployments alternate, so machine noise hits both alike. Printed: the median drain and publish
rates per deployment and their ratio.

Celery is not measured: kombu has no Redis Cluster transport, so there is no Celery run to put
beside it. On one machine the cluster cannot be faster (three servers share the same cores); what
it shows is the cost of a fetch going once per queue (one script call per primary) instead of
once for all queues.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from millpond.testing.servers import RedisClusterGroup, RedisServer
from millpond.wire.protocol import encode_task
from millpond_broker_redis import RedisBroker

OPTIONS = {"warn_without_persistence": False}


def fill(broker: RedisBroker, queues: list[str], n: int) -> float:
    """Publish n messages round-robin over the queues (one LPUSH each); returns messages/s."""
    messages = [encode_task("bench.noop", (i,)) for i in range(n)]
    start = time.perf_counter()
    for i, message in enumerate(messages):
        broker.publish(queues[i % len(queues)], message)
    return n / (time.perf_counter() - start)


def drain(broker: RedisBroker, queues: list[str], n: int) -> float:
    consumer = broker.consumer(queues, prefetch=64)
    try:
        got = 0
        start = time.perf_counter()
        while got < n:
            batch = consumer.fetch(64, 1.0)
            if not batch:
                raise RuntimeError(f"drained only {got} of {n}")
            consumer.ack(batch)
            got += len(batch)
        return n / (time.perf_counter() - start)
    finally:
        consumer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = RedisClusterGroup(Path(tmp) / "cluster").start()
        single = RedisServer(Path(tmp) / "single")
        single.extra = ["--port", str(single.port), "--appendonly", "no"]
        single.start()
        try:
            urls = {"cluster": cluster.url(), "single": f"redis://127.0.0.1:{single.port}/0"}
            brokers = {name: RedisBroker(url, OPTIONS) for name, url in urls.items()}
            rates: dict[str, dict[str, list[float]]] = {
                name: {"publish": [], "drain": []} for name in brokers
            }
            for _ in range(args.rounds):
                queues = cluster.names_on_distinct_primaries(f"bench-{uuid.uuid4().hex[:4]}")
                for name, broker in brokers.items():
                    rates[name]["publish"].append(fill(broker, queues, args.messages))
                    rates[name]["drain"].append(drain(broker, queues, args.messages))
            for broker in brokers.values():
                broker.close()
        finally:
            single.stop()
            cluster.stop()
    print(f"{args.messages} no-op messages over 3 queues, median of {args.rounds} rounds")
    for what in ("publish", "drain"):
        one = statistics.median(rates["single"][what])
        three = statistics.median(rates["cluster"][what])
        print(
            f"  {what:8s} single server {one:9,.0f}/s   3-primary cluster {three:9,.0f}/s   "
            f"cluster/single {three / one:.2f}"
        )


if __name__ == "__main__":
    main()
