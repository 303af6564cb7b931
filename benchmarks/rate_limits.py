"""Rate limits, millpond against Celery: a flood of a limited task in front of unlimited ones.

    .venv/bin/python benchmarks/rate_limits.py                  # Redis, threads 8, 2 repeats
    .venv/bin/python benchmarks/rate_limits.py --broker amqp    # RabbitMQ
    .venv/bin/python benchmarks/rate_limits.py --limited 60 --free 500 --repeats 1

Each run fills a fresh queue with `limited` messages of `rlbench.limited` (rate_limit 20/s) and,
behind them, `free` messages of the unlimited `rlbench.free`, all sent by one Celery producer; then
starts one worker (same pool, concurrency and prefetch multiplier 4 for both) and waits until every
task has run. The tasks record their own start times in Redis. Figures:

* `free_done_s`: from the first task's start to the last unlimited task's start (how long the
  unlimited work took with the flood in front of it), and `free_per_s` = free / that;
* `first_free_s`: from the first task's start to the first unlimited task's start;
* `limited_per_s`: the rate the limited tasks started at (first to last); `limited_max_in_1s`, the
  most of them that started within any one second (21 at most at 20/s: the bucket's first token
  and 20 more); `limited_min_gap_ms`, the shortest gap between two starts as the tasks saw them
  (50 ms at 20/s, less by the pool's hand-off jitter);
* `cpu_us_per_task`: the worker's CPU (whole process tree) over all the run's tasks.

Repeats alternate which framework goes first (interleaved), so a drifting machine affects both.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import redis  # noqa: E402

from benchmarks.brokers import Target, cleanup  # noqa: E402
from benchmarks.workers import WorkerProcess, _command  # noqa: E402

SIDE = "redis://127.0.0.1:6379/14"
BROKERS = {"redis": "redis://127.0.0.1:6379/14", "amqp": "amqp://guest:guest@127.0.0.1:5672//"}


def _worker(framework: str, broker: str, queue: str, pool: str, concurrency: int, rate: str,
            home: Path) -> WorkerProcess:  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MILLPOND_", "OTEL_"))}
    env.update({"PYTHONPATH": str(ROOT), "RLBENCH_BROKER": broker, "RLBENCH_SIDE": SIDE,
                "RLBENCH_QUEUE": queue, "RLBENCH_RATE": rate})  # fmt: skip
    if framework == "millpond":
        env.update({"MILLPOND_BROKER_URL": broker, "MILLPOND_IGNORE_RESULT": "true"})
        argv = [*_command("millpond"), "worker", "-A", "benchmarks.rate_limit_tasks:app",
                "-P", pool, "-c", str(concurrency), "--prefetch-multiplier", "4", "-Q", queue,
                "-l", "WARNING", "--no-banner"]  # fmt: skip
    else:
        argv = [*_command("celery"), "-A", "benchmarks.rate_limit_tasks:celery_app", "worker",
                "-P", pool, "-c", str(concurrency), "--prefetch-multiplier", "4", "-Q", queue,
                "--without-mingle", "--without-gossip", "--without-heartbeat",
                "-n", f"{queue}@%h", "-l", "WARNING"]  # fmt: skip
    return WorkerProcess(argv, env, home / f"{framework}-{queue}.log")


def _cpu(proc: WorkerProcess) -> float:
    total = 0.0
    try:
        root = psutil.Process(proc.pid)
        for p in [root, *root.children(recursive=True)]:
            times = p.cpu_times()
            total += times.user + times.system
    except psutil.Error:
        pass
    return total


def _fill(broker: str, queue: str, limited: int, free: int) -> None:
    """The backlog, from one Celery producer (it declares the queue, as Celery does): the limited
    flood first, the free tasks behind."""
    from celery import Celery

    app = Celery("rlbench-producer", broker=broker)
    app.conf.update(task_default_queue=queue, broker_connection_retry_on_startup=True)
    try:
        with app.connection_for_write() as conn:
            producer = app.amqp.Producer(conn)
            for _ in range(limited):
                app.send_task("rlbench.limited", queue=queue, producer=producer)
            for _ in range(free):
                app.send_task("rlbench.free", queue=queue, producer=producer)
    finally:
        app.close()


def _most_within(times: list[float], window: float) -> int:
    """The most of `times` (sorted) inside any `window` seconds: the limit as a caller sees it."""
    most, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] > window:
            start += 1
        most = max(most, end - start + 1)
    return most


def run(framework: str, broker_name: str, pool: str, concurrency: int, limited: int, free: int,
        rate: str, home: Path, timeout: float) -> dict[str, float]:  # fmt: skip
    broker = BROKERS[broker_name]
    queue = f"rlbench-{framework}-{uuid.uuid4().hex[:8]}"
    side = redis.Redis.from_url(SIDE)
    key = f"rlbench:{queue}"
    _fill(broker, queue, limited, free)
    worker = _worker(framework, broker, queue, pool, concurrency, rate, home)
    try:
        deadline = time.monotonic() + timeout
        while side.llen(f"{key}:limited") < limited or side.llen(f"{key}:free") < free:
            problem = worker.problem()
            if problem:
                raise RuntimeError(f"{framework} worker: {problem}\n{worker.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{framework}: not every task ran within {timeout:g} s "
                    f"({side.llen(f'{key}:limited')} limited, {side.llen(f'{key}:free')} free)"
                )
            time.sleep(0.1)
        cpu = _cpu(worker)
    finally:
        worker.stop()
    lim = sorted(float(v) for v in side.lrange(f"{key}:limited", 0, -1))
    fre = sorted(float(v) for v in side.lrange(f"{key}:free", 0, -1))
    side.delete(f"{key}:limited", f"{key}:free")
    side.close()
    cleanup(Target(broker_name, broker, True), queue)
    first = min(lim[0], fre[0])
    free_done = fre[-1] - first
    return {
        "free_done_s": free_done,
        "free_per_s": free / free_done if free_done > 0 else float("inf"),
        "first_free_s": fre[0] - first,
        "limited_per_s": (len(lim) - 1) / (lim[-1] - lim[0]),
        "limited_max_in_1s": float(_most_within(lim, 1.0)),
        "limited_min_gap_ms": min(b - a for a, b in itertools.pairwise(lim)) * 1000,
        "limited_duplicates": float(len(lim) - limited),
        "cpu_us_per_task": cpu / (limited + free) * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=sorted(BROKERS), default="redis")
    parser.add_argument("--pool", default="threads")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--limited", type=int, default=120, help="limited messages in front")
    parser.add_argument("--free", type=int, default=2000, help="unlimited messages behind")
    parser.add_argument("--rate", default="20/s")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--framework", choices=("both", "millpond", "celery"), default="both")
    ns = parser.parse_args()
    frameworks = ("millpond", "celery") if ns.framework == "both" else (ns.framework,)
    home = Path(tempfile.mkdtemp(prefix="rlbench-"))
    runs: dict[str, list[dict[str, float]]] = {"millpond": [], "celery": []}
    for repeat in range(ns.repeats):
        for framework in frameworks if repeat % 2 == 0 else frameworks[::-1]:
            figures = run(framework, ns.broker, ns.pool, ns.concurrency, ns.limited, ns.free,
                          ns.rate, home, ns.timeout)  # fmt: skip
            runs[framework].append(figures)
            print(f"repeat {repeat} {framework:8} " + ", ".join(
                f"{k} {v:,.2f}" for k, v in figures.items()), flush=True)  # fmt: skip
    print(f"\n{ns.limited} limited ({ns.rate}) in front of {ns.free} unlimited on {ns.broker}, "
          f"{ns.pool} {ns.concurrency}, medians of {ns.repeats}:")  # fmt: skip
    if len(frameworks) == 1:
        print("| figure | " + frameworks[0] + " |\n|---|---|")
        for key in runs[frameworks[0]][0]:
            value = statistics.median(r[key] for r in runs[frameworks[0]])
            print(f"| {key} | {value:,.2f} |")
        return 0
    print("| figure | millpond | Celery | millpond / Celery |\n|---|---|---|---|")
    for key in runs["millpond"][0]:
        m = statistics.median(r[key] for r in runs["millpond"])
        c = statistics.median(r[key] for r in runs["celery"])
        ratio = f"{m / c:.2f}x" if c else "-"
        print(f"| {key} | {m:,.2f} | {c:,.2f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
