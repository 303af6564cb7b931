"""Load: many tasks through one broker, consumed by three workers at once (prefork, threads, gevent).

    .venv/bin/python benchmarks/load_all.py                      # 100,000 tasks, Redis then RabbitMQ
    .venv/bin/python benchmarks/load_all.py --tasks 20000 --broker redis
    .venv/bin/python benchmarks/load_all.py --json benchmarks/results/load.json

The queue is filled first, then the three workers start together and drain it. Every task appends
its id to a ledger (benchmarks/load_app.py), so the run accounts for each one: lost (never ran) or
duplicated (ran more than once). The resident memory of each worker's process tree is sampled
every 0.1 s while it drains; "growth" compares the median of the second quarter of the run
with the median of the last quarter, which is what a leak would move (the first quarter holds the
warm-up). Not part of the test suite: tests/faults/test_three_workers.py runs the same code with
5,000 tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
URLS = {"redis": "redis://127.0.0.1:6379/0", "amqp": "amqp://guest:guest@127.0.0.1:5672//"}
WORKERS: tuple[tuple[str, int], ...] = (("prefork", 2), ("threads", 8), ("gevent", 50))
TASK = "load.noop"
_LINE = 37  # a uuid4 and a newline
_MIB = 1024 * 1024


@dataclass
class Worker:
    pool: str
    concurrency: int
    proc: subprocess.Popen[bytes]
    log: Path
    rss: list[tuple[float, int]] = field(default_factory=list)

    def tree_rss(self) -> int:
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(raw))
            except ValueError:
                out.append({"event": raw})
        return out

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.pool} worker exited with {self.proc.returncode}:\n{tail}")
        return any(line.get("event") == "worker ready" for line in self.lines())

    def stop(self, timeout: float = 60) -> int | None:
        """Warm stop by PID; SIGKILL to the whole tree if it does not finish in time."""
        try:
            tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(True)]
        except psutil.Error:
            tree = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        for proc in tree:
            try:
                proc.kill()
            except psutil.Error:
                pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        return self.proc.returncode


def _wait(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _progress(ledger: Path) -> int:
    try:
        return ledger.stat().st_size // _LINE
    except FileNotFoundError:
        return 0


def fill(broker_url: str, queue: str, tasks: int) -> list[str]:
    """Publish `tasks` no-op messages and wait until the broker holds them all."""
    from millpond.config import plugins
    from millpond.wire.protocol import encode_task

    ids = [str(uuid.uuid4()) for _ in range(tasks)]
    amqp = broker_url.startswith("amqp")
    # RabbitMQ: without publisher confirms (the wait on the queue length below confirms)
    options = {"confirm_publish": False} if amqp else {}
    broker = plugins.broker_for_url(broker_url, options)
    try:
        broker.declare([queue])

        def send(chunk: Sequence[str]) -> None:
            for task_id in chunk:
                broker.publish(queue, encode_task(TASK, task_id=task_id))

        threads = 1 if amqp else 4  # one AMQP channel is not shared; redis-py's pool is
        step = (tasks + threads - 1) // threads
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(send, [ids[i : i + step] for i in range(0, tasks, step)]))
        _wait(lambda: broker.queue_length(queue) >= tasks, 120, f"{tasks} messages in {queue}")
    finally:
        broker.close()
    return ids


def cleanup(broker_url: str, queue: str) -> None:
    from millpond.config import plugins

    broker = plugins.broker_for_url(broker_url, {})
    try:
        for name in (queue, f"{queue}.dead"):
            try:
                broker.purge(name)
            except Exception:
                pass
    finally:
        broker.close()
    if broker_url.startswith("amqp"):
        import amqp as pyamqp

        conn = pyamqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
        conn.connect()
        try:
            chan = conn.channel()
            for name in (queue, f"{queue}.dead"):
                try:
                    chan.queue_delete(name)
                    chan.exchange_delete(name)
                except Exception:
                    pass
        finally:
            conn.close()


def spawn(
    pool: str,
    concurrency: int,
    broker_url: str,
    queue: str,
    directory: Path,
    extra_env: dict[str, str],
) -> Worker:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MILLPOND_", "OTEL_"))}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])),
            "MILLPOND_BROKER_URL": broker_url,
            "MILLPOND_QUEUES": queue,
            "MILLPOND_IGNORE_RESULT": "true",
            "MILLPOND_LOG_FORMAT": "json",
            "LOAD_DIR": str(directory),
            **extra_env,
        }
    )
    log = directory / f"{pool}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "millpond", "worker", "--no-banner", "-A",
             "benchmarks.load_app:app", "-P", pool, "-c", str(concurrency)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    return Worker(pool, concurrency, proc, log)


def _growth(samples: list[tuple[float, int]], start: float, end: float) -> dict[str, float]:
    """RSS medians of the run's quarters (MiB) and the growth from the second to the last."""
    span = max(end - start, 1e-9)
    quarters: list[list[int]] = [[], [], [], []]
    for at, rss in samples:
        if start <= at <= end:
            quarters[min(3, int(4 * (at - start) / span))].append(rss)
    med = [statistics.median(q) / _MIB if q else 0.0 for q in quarters]
    return {
        "q1_mib": round(med[0], 1),
        "q2_mib": round(med[1], 1),
        "q3_mib": round(med[2], 1),
        "q4_mib": round(med[3], 1),
        "growth_q2_to_q4_mib": round(med[3] - med[1], 1) if med[1] and med[3] else 0.0,
    }


def run(
    broker_url: str,
    tasks: int,
    directory: Path,
    *,
    workers: Sequence[tuple[str, int]] = WORKERS,
    timeout: float = 900,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Fill a fresh queue with `tasks` no-ops, drain it with the workers at once, account for all."""
    directory.mkdir(parents=True, exist_ok=True)
    ledger = directory / "done.log"
    queue = f"load-{uuid.uuid4().hex[:10]}"
    started = time.monotonic()
    ids = fill(broker_url, queue, tasks)
    fill_s = time.monotonic() - started
    running = [spawn(p, c, broker_url, queue, directory, env or {}) for p, c in workers]
    halt = threading.Event()
    try:
        _wait(lambda: all(w.ready() for w in running), 60, "the workers to be ready")
        t0 = time.monotonic()

        def sample() -> None:
            while not halt.is_set():
                now = time.monotonic()
                for worker in running:
                    worker.rss.append((now, worker.tree_rss()))
                halt.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        def drained() -> bool:
            for worker in running:
                if worker.proc.poll() is not None:
                    raise RuntimeError(f"the {worker.pool} worker died during the run")
            return _progress(ledger) >= tasks and set(ids) <= set(ledger.read_text().split())

        _wait(drained, timeout, f"{tasks} tasks to run", interval=0.2)
        elapsed = time.monotonic() - t0
        halt.set()
        sampler.join(5)
    finally:
        halt.set()
        codes = {w.pool: w.stop() for w in running}
        cleanup(broker_url, queue)
    counts = Counter(ledger.read_text().split())
    wanted = set(ids)
    per_worker = {}
    for worker in running:
        stopped = [line for line in worker.lines() if line.get("event") == "worker stopped"]
        rss = [r for _, r in worker.rss]
        per_worker[worker.pool] = {
            "concurrency": worker.concurrency,
            "processed": stopped[-1].get("processed") if stopped else None,
            "exit": codes[worker.pool],
            "peak_rss_mib": round(max(rss) / _MIB, 1) if rss else None,
            **_growth(worker.rss, t0, t0 + elapsed),
        }
    return {
        "broker": broker_url.split(":", 1)[0],
        "tasks": tasks,
        "fill_s": round(fill_s, 2),
        "drain_s": round(elapsed, 2),
        "tasks_per_s": round(tasks / elapsed),
        "lost": sum(1 for i in ids if counts[i] == 0),
        "duplicated": sum(1 for i in wanted if counts[i] > 1),
        "extra_runs": sum(n - 1 for i, n in counts.items() if i in wanted and n > 1),
        "workers": per_worker,
    }


def describe(result: dict[str, Any]) -> str:
    lines = [
        f"{result['broker']}: {result['tasks']:,} tasks drained in {result['drain_s']} s "
        f"({result['tasks_per_s']:,}/s; queue filled in {result['fill_s']} s); "
        f"lost {result['lost']}, duplicated {result['duplicated']}"
    ]
    for pool, w in result["workers"].items():
        lines.append(
            f"  {pool:8} -c {w['concurrency']:<3} processed {w['processed']}, exit {w['exit']}, "
            f"peak RSS {w['peak_rss_mib']} MiB, RSS by quarter {w['q1_mib']} / {w['q2_mib']} / "
            f"{w['q3_mib']} / {w['q4_mib']} MiB (growth q2->q4 {w['growth_q2_to_q4_mib']} MiB)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--broker", default="redis,amqp", help="redis, amqp or both (comma)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    ns = parser.parse_args(argv)
    results = []
    for name in [b.strip() for b in ns.broker.split(",") if b.strip()]:
        if name not in URLS:
            parser.error(f"unknown broker {name!r}: choose from {', '.join(URLS)}")
        with tempfile.TemporaryDirectory(prefix=f"load-{name}-") as tmp:
            result = run(URLS[name], ns.tasks, Path(tmp))
        print(describe(result), flush=True)
        results.append(result)
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps(results, indent=2))
    bad = [r for r in results if r["lost"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
