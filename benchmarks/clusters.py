"""No-op throughput on the scale-out setups, millpond against Celery, interleaved in one run.

    python3 benchmarks/clusters.py                 # 5,000 no-ops per run, threads with 8
    python3 benchmarks/clusters.py -n 2000 --repeat 3 --setup rabbit-cluster

Starts the setups itself, privately, on free loopback ports (`millpond.testing.servers`):

* `rabbit-cluster`: three RabbitMQ nodes joined into one cluster, quorum queues (Celery with
  `task_default_queue_type = "quorum"`), both frameworks given the three nodes as kombu's
  failover URL (`amqp://n1//;amqp://n2//;amqp://n3//`);
* `sentinel`: a Redis primary, a replica and three sentinels; millpond on
  `redis+sentinel://s1,s2,s3/0?master_name=mymaster`, Celery on kombu's
  `sentinel://s1;sentinel://s2;sentinel://s3` with the master name in its transport options.

Each run is the main harness's drain (`scenarios.drain_and_latency`, no latency probes): the queue
filled first, then one worker started and timed from its first task to its last. The frameworks
alternate within each repeat. The figures, their ratio and the worker's CPU per task (its whole
life, start-up included) are printed as a markdown table and saved as JSON under
`benchmarks/results/`. Redis on 127.0.0.1:6379 carries the tasks' marks, as in `run.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks import brokers  # noqa: E402
from benchmarks.model import CELERY, MILLPOND, Combo, Record  # noqa: E402
from benchmarks.scenarios import Context, drain_and_latency  # noqa: E402
from benchmarks.side import DEFAULT_URL, SideChannel  # noqa: E402

SETUPS = ("rabbit-cluster", "sentinel")


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set variables for the harness process (producers) and, through `workers.environment`,
    for the workers; restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextmanager
def rabbit_cluster(where: Path) -> Iterator[dict[str, brokers.Target]]:
    from millpond.testing.servers import RabbitCluster

    cluster = RabbitCluster(where / "rabbit").start()
    try:
        url = cluster.urls()
        with _environ(BENCH_QUEUE_TYPE="quorum", MILLPOND_AMQP__QUEUE_TYPE="quorum"):
            target = brokers.Target("amqp", url, celery=True)
            yield {MILLPOND: target, CELERY: target}
    finally:
        cluster.stop()


@contextmanager
def sentinel(where: Path) -> Iterator[dict[str, brokers.Target]]:
    from millpond.testing.servers import SentinelGroup

    group = SentinelGroup(where / "sentinel").start()
    try:
        kombu_url = ";".join(f"sentinel://127.0.0.1:{p}" for p in group.sentinel_ports)
        with _environ(BENCH_MASTER_NAME=group.master_name):
            yield {
                MILLPOND: brokers.Target("redis", group.url(), celery=True),
                CELERY: brokers.Target("redis", kombu_url, celery=True),
            }
    finally:
        group.stop()


STARTERS = {"rabbit-cluster": rabbit_cluster, "sentinel": sentinel}


def _summary(records: list[Record]) -> str:
    lines = [
        "| setup | framework | runs | median tasks/s | CPU ms per task | ratio millpond/Celery |",
        "|---|---|---|---|---|---|",
    ]
    by: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        by.setdefault((r.broker, r.framework), []).append(r)
    medians: dict[tuple[str, str], float] = {}
    for (setup, framework), rs in sorted(by.items()):
        good = sorted(r.value for r in rs if r.ok and r.value)
        if good:
            medians[(setup, framework)] = good[len(good) // 2]
    for (setup, framework), rs in sorted(by.items()):
        runs = [r for r in rs if r.ok and r.value]
        cpu = [1000 * r.metrics["cpu_s"] / r.metrics["n"] for r in runs if r.metrics.get("cpu_s")]
        median = medians.get((setup, framework))
        ratio = ""
        if framework == MILLPOND and (setup, CELERY) in medians and median:
            ratio = f"{median / medians[(setup, CELERY)]:.2f}x"
        errors = "; ".join(r.error or "" for r in rs if not r.ok)
        lines.append(
            f"| {setup} | {framework} | {len(good)}/{len(rs)} | "
            f"{f'{median:,.0f}' if median else 'failed: ' + errors[:200]} | "
            f"{f'{sorted(cpu)[len(cpu) // 2]:.2f}' if cpu else ''} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", type=int, default=5000, help="no-op tasks per run (5000)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per framework and setup (1)")
    ap.add_argument("--setup", default=",".join(SETUPS), help=f"comma-separated: {SETUPS}")
    ap.add_argument("--pool", default="threads", help="pool of both workers (threads)")
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--side-url", default=DEFAULT_URL)
    ns = ap.parse_args(argv)
    side = SideChannel(ns.side_url)
    problem = side.check()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = out_dir / f"clusters-{stamp}.json"
    records: list[Record] = []
    with tempfile.TemporaryDirectory(prefix="millpond-clusters-") as tmp:
        where = Path(tmp)
        ctx = Context(side=side, run_dir=where, timeout=ns.timeout, grace=15)
        for setup in [s.strip() for s in ns.setup.split(",") if s.strip()]:
            began = time.monotonic()
            with STARTERS[setup](where) as targets:
                print(f"{setup}: up in {time.monotonic() - began:.1f} s", flush=True)
                combo = Combo(setup, ns.pool, ns.concurrency)
                for repeat in range(ns.repeat):
                    # millpond and Celery only: Dramatiq has no Sentinel or quorum-queue option
                    pair = (MILLPOND, CELERY)
                    order = pair if repeat % 2 == 0 else pair[::-1]
                    for framework in order:
                        got = drain_and_latency(
                            ctx, framework, combo, targets[framework], repeat, ns.n, 0
                        )
                        for r in got:
                            shown = f"{r.value:.0f} tasks/s" if r.ok and r.value else r.error
                            print(f"  {framework}: {shown}", flush=True)
                        records += got
                        out.write_text(json.dumps([r.to_json() for r in records], indent=1))
    print(_summary(records))
    print(f"saved {out.relative_to(ROOT)}")
    return 0 if all(r.ok for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
