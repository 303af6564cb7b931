"""Remote control at 1,000 nodes: what a `ping` to the whole fleet costs Redis, and how long the
replies take, with millpond's caller and Celery's caller interleaved against the same nodes.

    python benchmarks/control_fanout.py --nodes 1000 --procs 4 --rounds 10
    python benchmarks/control_fanout.py --amqp-url amqp://guest:guest@HOST:5672// --nodes 100

A private redis-server (free port, temp dir) carries everything, so its CPU time (from
/proc/<pid>/stat) and memory (INFO) are the fleet's alone. A node is the pidbox part of a worker
and nothing else: its own listening connection (a PSUBSCRIBE on `/0.celery.pidbox`), a thread
that answers `ping` through `Broker.broadcast` exactly as a worker's node does (reply with a TTL),
`--procs` processes of `--nodes / --procs` threads each. Each round one caller broadcasts a
`ping` and waits until every node has answered; the rounds alternate between millpond's
`Mailbox.call` and Celery's `app.control.ping`.

Then the leftovers: a caller that gives up before the replies arrive (Celery's usual "No nodes
replied within time constraint" at a large fleet) leaves them in its reply list. With the reply
TTL they are gone after `reply_ttl`; without it (what Celery's workers do) they stay.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_nodes(
    url: str, namespace: str, first: int, count: int, ttl: float | None, ready: Any, stop: Any
) -> None:
    """One process of simulated nodes: `count` listening threads answering ping."""
    from millpond.config.plugins import broker_for_url
    from millpond.contracts.broadcast import Exchange, Listen
    from millpond_control.client import encode, matches, node_queue, pidbox_exchange
    from millpond_control.registry import Request  # noqa: F401 - the node's shapes

    # every thread of this process may reply at once: one pooled connection each
    options = {"max_connections": count + 10} if url.startswith("redis") else {}
    broker = broker_for_url(url, options)

    def node(index: int) -> None:
        name = f"node{index}@bench"
        spec = Listen(
            node_queue(name, namespace),
            pidbox_exchange(namespace),
            auto_delete=True,
            message_ttl=300.0,
            expires=10.0,
        )
        sub = broker.listen(spec)
        ready.release()
        clock = 0
        while not stop.is_set():
            for got in sub.receive(0.5):
                body = json.loads(got.message.body)
                if not matches(name, body) or body.get("method") != "ping":
                    continue
                reply_to = body.get("reply_to") or {}
                # the benchmark's own knob: -1 answers as Celery's workers do, without a TTL
                asked = (body.get("arguments") or {}).get("bench_reply_ttl")
                reply_ttl = ttl if asked is None else (None if asked < 0 else asked)
                clock += 1
                message = encode(
                    {name: {"ok": "pong"}}, {"ticket": body.get("ticket"), "clock": clock}
                )
                broker.broadcast(
                    Exchange(reply_to["exchange"], "direct"),
                    message,
                    reply_to["routing_key"],
                    ttl=reply_ttl,
                )
        sub.close()

    threads = [threading.Thread(target=node, args=(first + i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    stop.wait()
    for thread in threads:
        thread.join(2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10, help="ping rounds per caller")
    parser.add_argument("--reply-ttl", type=float, default=10.0)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument(
        "--amqp-url",
        help="run the rounds on this RabbitMQ instead (latency only). Each node opens a "
        "connection: 1,000 nodes need a server whose file-descriptor limit is well above 1,000 "
        "(a RabbitMQ out of descriptors stops accepting and can break its classic queues), so "
        "point this at a server of your own, never a shared one",
    )
    args = parser.parse_args()
    if args.amqp_url:
        return run_amqp(args)

    import redis
    from celery import Celery

    from millpond.testing.servers import RedisServer
    from millpond_broker_redis import RedisBroker
    from millpond_control.client import Mailbox

    workdir = Path(tempfile.mkdtemp(prefix="control-fanout-"))
    server = RedisServer(workdir)
    server.extra = ["--port", str(server.port), "--maxclients", "20000", "--appendonly", "no"]
    server.start()
    assert server.proc is not None
    url = f"redis://127.0.0.1:{server.port}/0"
    client = redis.Redis(port=server.port, decode_responses=True)
    base_mem = int(client.info("memory")["used_memory"])
    base_rss = _rss_kib(server.proc.pid)

    ctx = multiprocessing.get_context("fork")
    ready = ctx.Semaphore(0)
    stop = ctx.Event()
    per = args.nodes // args.procs
    procs = [
        ctx.Process(
            target=run_nodes,
            args=(url, "celery", p * per, per, args.reply_ttl, ready, stop),
            daemon=True,
        )
        for p in range(args.procs)
    ]
    figures: dict[str, Any] = {"nodes": per * args.procs, "procs": args.procs}
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + 120
        for _ in range(per * args.procs):
            if not ready.acquire(timeout=max(0.1, deadline - time.monotonic())):
                raise SystemExit("the nodes did not all start listening within 120 s")
        # each node confirmed its subscription before it said it was ready
        subscribed = sum(1 for c in client.client_list() if int(c.get("psub", 0)) > 0)
        info = client.info()
        figures["idle"] = {
            "connected_clients": info["connected_clients"],
            "subscribed_nodes": subscribed,
            "used_memory_mib": (int(info["used_memory"]) - base_mem) / 2**20,
            "rss_mib": (_rss_kib(server.proc.pid) - base_rss) / 1024,
        }

        broker = RedisBroker(url)
        mailbox = Mailbox(broker)
        celery_app = Celery("bench", broker=url)
        celery_app.conf.broker_connection_retry_on_startup = True
        want = per * args.procs
        rounds: dict[str, list[dict[str, float]]] = {"millpond": [], "celery": []}

        def one(kind: str) -> dict[str, float]:
            cpu0 = _cpu_seconds(server.proc.pid)  # type: ignore[union-attr]
            first: list[float] = []
            start = time.monotonic()
            if kind == "millpond":

                def seen(_reply: dict[str, Any]) -> None:
                    if not first:
                        first.append(time.monotonic() - start)

                got = mailbox.call("ping", timeout=30.0, limit=want, on_reply=seen)
            else:
                got = celery_app.control.ping(timeout=30.0, limit=want)
            elapsed = time.monotonic() - start
            cpu = _cpu_seconds(server.proc.pid) - cpu0  # type: ignore[union-attr]
            return {
                "replies": len(got),
                "all_s": elapsed,
                "first_s": first[0] if first else float("nan"),
                "redis_cpu_s": cpu,
            }

        one("millpond")  # warm-up: both callers declare their reply queues
        one("celery")
        for _ in range(args.rounds):
            for kind in ("millpond", "celery"):
                rounds[kind].append(one(kind))
        figures["rounds"] = rounds
        figures["summary"] = {
            kind: {
                "replies_min": min(r["replies"] for r in rs),
                "all_s_median": statistics.median(r["all_s"] for r in rs),
                "redis_cpu_ms_median": 1000 * statistics.median(r["redis_cpu_s"] for r in rs),
            }
            for kind, rs in rounds.items()
        }
        figures["summary"]["millpond"]["first_ms_median"] = 1000 * statistics.median(
            r["first_s"] for r in rounds["millpond"]
        )

        # leftovers: a caller that stops reading at once and never cleans up (it exited)
        figures["leftover"] = {}
        for label, asked in (("with reply_ttl 3 s", 3.0), ("without a TTL, as Celery", -1.0)):
            gone = Mailbox(broker)
            gone.call("ping", {"bench_reply_ttl": asked}, timeout=0.001)
            reply_key = f"{gone.oid}.reply.celery.pidbox"
            gone._replies = None
            time.sleep(1.5)  # the replies arrive meanwhile; nobody reads them
            landed = int(client.llen(reply_key))
            size = int(client.memory_usage(reply_key) or 0)
            time.sleep(3.0)  # past the TTL
            figures["leftover"][label] = {
                "replies_waiting_after_1.5_s": landed,
                "key_bytes": size,
                "replies_left_after_4.5_s": int(client.llen(reply_key)),
            }
        figures["busy"] = {
            "used_memory_mib": (int(client.info("memory")["used_memory"]) - base_mem) / 2**20
        }
        mailbox.close()
        celery_app.close()
        broker.close()
    finally:
        stop.set()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        server.stop()
    print(json.dumps(figures["summary"], indent=2))
    print(json.dumps({k: figures[k] for k in ("idle", "leftover", "busy")}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    return 0


def run_amqp(args: argparse.Namespace) -> int:
    """The same rounds on RabbitMQ: reply latency and replies received (no server figures)."""
    import uuid

    from celery import Celery

    from millpond.config.plugins import broker_for_url
    from millpond_control.client import Mailbox

    url = args.amqp_url
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Semaphore(0)
    stop = ctx.Event()
    per = args.nodes // args.procs
    want = per * args.procs
    procs = [
        ctx.Process(
            target=run_nodes,
            args=(url, namespace, p * per, per, args.reply_ttl, ready, stop),
            daemon=True,
        )
        for p in range(args.procs)
    ]
    figures: dict[str, Any] = {"broker": "amqp", "nodes": want}
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + 180
        for _ in range(want):
            if not ready.acquire(timeout=max(0.1, deadline - time.monotonic())):
                raise SystemExit("the nodes did not all start listening within 180 s")
        broker = broker_for_url(url, {})
        mailbox = Mailbox(broker, namespace=namespace)
        celery_app = Celery("bench", broker=url)
        celery_app.conf.control_exchange = namespace
        rounds: dict[str, list[dict[str, float]]] = {"millpond": [], "celery": []}

        def one(kind: str) -> dict[str, float]:
            start = time.monotonic()
            if kind == "millpond":
                got = mailbox.call("ping", timeout=30.0, limit=want)
            else:
                got = celery_app.control.ping(timeout=30.0, limit=want)
            return {"replies": len(got), "all_s": time.monotonic() - start}

        one("millpond")
        one("celery")
        for _ in range(args.rounds):
            for kind in ("millpond", "celery"):
                rounds[kind].append(one(kind))
        figures["rounds"] = rounds
        figures["summary"] = {
            kind: {
                "replies_min": min(r["replies"] for r in rs),
                "all_s_median": statistics.median(r["all_s"] for r in rs),
            }
            for kind, rs in rounds.items()
        }
        mailbox.close()
        celery_app.close()
        broker.close()
    finally:
        stop.set()
        for proc in procs:
            proc.join(15)
            if proc.is_alive():
                proc.kill()
    print(json.dumps(figures["summary"], indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
