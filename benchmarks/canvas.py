"""Canvas throughput, millpond against Celery: a 1,000-task chord and a 1,000-step chain.

    .venv/bin/python benchmarks/canvas.py                 # Redis, threads 8, 3 repeats
    .venv/bin/python benchmarks/canvas.py --broker amqp   # RabbitMQ, results in Redis
    .venv/bin/python benchmarks/canvas.py --size 200 --repeats 1

Each repeat runs both frameworks one after the other (interleaved, so a drifting machine affects
both alike), each with its own worker subprocess on the same broker, pool and concurrency, and its
own producer: a chord of `size` `cbench.add` tasks whose body `cbench.tsum` sums their results, then
a chain of `size` `cbench.add` steps. The figure is tasks (or steps) per second from sending to the
body's (or the last step's) result, and the worker's CPU per task. Results go to Redis db 14 for
both (the backend Celery joins chords with), the broker queue is unique per run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from benchmarks.workers import WorkerProcess, _command  # noqa: E402

RESULTS = "redis://127.0.0.1:6379/14"
BROKERS = {"redis": "redis://127.0.0.1:6379/14", "amqp": "amqp://guest:guest@127.0.0.1:5672//"}


def _worker(framework: str, broker: str, queue: str, pool: str, concurrency: int,
            home: Path) -> WorkerProcess:  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MILLPOND_", "OTEL_"))}
    env.update({"PYTHONPATH": str(ROOT), "CBENCH_BROKER": broker, "CBENCH_RESULTS": RESULTS,
                "CBENCH_QUEUE": queue})  # fmt: skip
    if framework == "millpond":
        env.update(
            {
                "MILLPOND_BROKER_URL": broker,
                "MILLPOND_RESULT_BACKEND": RESULTS,
                "MILLPOND_DEFAULT_QUEUE": queue,
            }
        )
        argv = [*_command("millpond"), "worker", "-A", "benchmarks.canvas_tasks:app", "-P", pool,
                "-c", str(concurrency), "-Q", queue, "-l", "WARNING", "--no-banner"]  # fmt: skip
    else:
        argv = [*_command("celery"), "-A", "benchmarks.canvas_tasks:celery_app", "worker",
                "-P", pool, "-c", str(concurrency), "-Q", queue, "--without-mingle",
                "--without-gossip", "--without-heartbeat", "-n", f"{queue}@%h",
                "-l", "WARNING"]  # fmt: skip
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


def _producer(framework: str, broker: str, queue: str) -> Any:
    os.environ["CBENCH_BROKER"], os.environ["CBENCH_RESULTS"] = broker, RESULTS
    os.environ["CBENCH_QUEUE"] = queue
    if framework == "millpond":
        from millpond import Millpond

        app = Millpond("cbench-producer", broker_url=broker, result_backend=RESULTS,
                       default_queue=queue)  # fmt: skip
        return app, app.signature("cbench.add"), app.signature("cbench.tsum")
    from celery import Celery, signature

    capp = Celery("cbench-producer", broker=broker, backend=RESULTS)
    capp.conf.update(task_default_queue=queue, broker_connection_retry_on_startup=True)
    return (capp, signature("cbench.add", app=capp), signature("cbench.tsum", app=capp))


def _chord(framework: str, app: Any, add: Any, tsum: Any, size: int) -> float:
    if framework == "millpond":
        from millpond import chord
    else:
        from celery import chord  # type: ignore[no-redef]
    started = time.perf_counter()
    result = chord((add.clone((i, i)) for i in range(size)), tsum.clone())()
    value = result.get(timeout=600)
    elapsed = time.perf_counter() - started
    assert value == sum(2 * i for i in range(size)), value
    return elapsed


def _chain(framework: str, app: Any, add: Any, size: int) -> float:
    if framework == "millpond":
        from millpond import chain
    else:
        from celery import chain  # type: ignore[no-redef]
    started = time.perf_counter()
    result = chain(add.clone((0, 0)), *(add.clone((1,)) for _ in range(size - 1)))()
    value = result.get(timeout=600)
    elapsed = time.perf_counter() - started
    assert value == size - 1, value
    return elapsed


def run(framework: str, broker: str, pool: str, concurrency: int, size: int,
        home: Path, only: tuple[str, ...] = ("chord", "chain")) -> dict[str, float]:  # fmt: skip
    queue = f"cbench-{framework}-{uuid.uuid4().hex[:8]}"
    worker = _worker(framework, broker, queue, pool, concurrency, home)
    app, add, tsum = _producer(framework, broker, queue)
    try:
        add.clone((1, 1)).apply_async().get(timeout=120)  # the worker is up and warm
        out: dict[str, float] = {}
        if "chord" in only:
            cpu0 = _cpu(worker)
            chord_s = _chord(framework, app, add, tsum, size)
            out["chord_tasks_per_s"] = (size + 1) / chord_s
            out["chord_cpu_us_per_task"] = (_cpu(worker) - cpu0) / (size + 1) * 1e6
        if "chain" in only:
            cpu1 = _cpu(worker)
            chain_s = _chain(framework, app, add, size)
            out["chain_steps_per_s"] = size / chain_s
            out["chain_cpu_us_per_step"] = (_cpu(worker) - cpu1) / size * 1e6
    finally:
        worker.stop()
        if framework == "millpond":
            app.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=sorted(BROKERS), default="redis")
    parser.add_argument("--pool", default="threads")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("chord", "chain"), help="one of the two canvases")
    ns = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="cbench-"))
    runs: dict[str, list[dict[str, float]]] = {"millpond": [], "celery": []}
    for repeat in range(ns.repeats):
        for framework in ("millpond", "celery") if repeat % 2 == 0 else ("celery", "millpond"):
            only = (ns.only,) if ns.only else ("chord", "chain")
            figures = run(
                framework, BROKERS[ns.broker], ns.pool, ns.concurrency, ns.size, home, only
            )
            runs[framework].append(figures)
            print(f"repeat {repeat} {framework:8} " + ", ".join(
                f"{k} {v:,.0f}" for k, v in figures.items()), flush=True)  # fmt: skip
    print(f"\n{ns.size}-task chord and {ns.size}-step chain on {ns.broker}, {ns.pool} "
          f"{ns.concurrency}, medians of {ns.repeats}:")  # fmt: skip
    print("| figure | millpond | Celery | ratio |\n|---|---|---|---|")
    for key in runs["millpond"][0]:
        m = statistics.median(r[key] for r in runs["millpond"])
        c = statistics.median(r[key] for r in runs["celery"])
        print(f"| {key} | {m:,.0f} | {c:,.0f} | {m / c:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
