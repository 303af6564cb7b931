"""Green pools against threads on I/O-bound work: 1,000 tasks that each sleep 10 ms.

    .venv/bin/python benchmarks/green_vs_threads.py [--broker redis] [--tasks 1000] [--repeats 3]
                                                    [--celery] [--sleep 0.01]

threads (16), gevent (100) and eventlet (100) drain the same batch from the same broker, in the same
run, interleaved round by round so machine noise hits each alike; the median of the rounds is
reported with the ceiling each concurrency allows (concurrency / sleep). `--celery` adds Celery's
same pools on the same broker for a ratio.

The measuring is the shared harness's sleep scenario (`benchmarks.scenarios.sleep_drain`): with no
worker running, enqueue [mark start, N x bench.sleep], start `millpond worker -P <pool> -c <n>`,
and time the first task's start to the last task's end through the Redis side channel; results
ignored, log level WARNING, tracing off.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks import brokers  # noqa: E402
from benchmarks.model import CELERY, MILLPOND, Combo, Record  # noqa: E402
from benchmarks.scenarios import Context, sleep_drain  # noqa: E402
from benchmarks.side import SideChannel  # noqa: E402

POOLS = (("threads", 16), ("gevent", 100), ("eventlet", 100))


def _median(records: list[Record]) -> float | None:
    values = [r.value for r in records if r.ok and r.value is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None) -> str:
    return "failed" if value is None else f"{value:,.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=brokers.BROKERS, default="redis")
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--sleep", type=float, default=0.010, help="seconds each task sleeps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--celery", action="store_true", help="also run Celery's same pools")
    parser.add_argument("--redis-db", type=int, default=14, help="Redis db of the redis broker")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one run may take")
    ns = parser.parse_args(argv)

    side = SideChannel()
    problem = side.check()
    run_dir = Path(tempfile.mkdtemp(prefix="millpond-green-bench-"))
    target = brokers.target(ns.broker, run_dir, ns.redis_db)
    problem = problem or target.check()
    if problem:
        print(f"green_vs_threads: {problem}", file=sys.stderr)
        return 2
    frameworks = [MILLPOND] + ([CELERY] if ns.celery and target.celery else [])
    ctx = Context(side=side, run_dir=run_dir, timeout=ns.timeout, grace=10.0)
    records: dict[tuple[str, str], list[Record]] = {}
    try:
        for repeat in range(ns.repeats):
            for pool, concurrency in POOLS:
                combo = Combo(ns.broker, pool, concurrency)
                for framework in frameworks:
                    record = sleep_drain(ctx, framework, combo, target, repeat, ns.tasks, ns.sleep)
                    records.setdefault((framework, pool), []).append(record)
                    shown = _fmt(record.value) if record.ok else f"FAILED: {record.error}"
                    print(
                        f"  round {repeat + 1}: {framework} {pool} {concurrency}: {shown}",
                        flush=True,
                    )
    finally:
        side.close()
        brokers.remove_dir(run_dir)

    print(
        f"\n{ns.tasks} tasks sleeping {ns.sleep * 1000:g} ms on {ns.broker}, "
        f"median of {ns.repeats} (tasks/s)\n"
    )
    header = "| pool | concurrency | ceiling | millpond | % of ceiling |"
    rule = "|---|---|---|---|---|"
    if CELERY in frameworks:
        header += " Celery | millpond / Celery |"
        rule += "---|---|"
    print(header)
    print(rule)
    for pool, concurrency in POOLS:
        ceiling = concurrency / ns.sleep
        mine = _median(records[(MILLPOND, pool)])
        row = f"| {pool} | {concurrency} | {ceiling:,.0f} | {_fmt(mine)} | "
        row += f"{100 * mine / ceiling:.0f} % |" if mine else "- |"
        if CELERY in frameworks:
            theirs = _median(records[(CELERY, pool)])
            ratio = f"{mine / theirs:.2f}" if mine and theirs else "-"
            row += f" {_fmt(theirs)} | {ratio} |"
        print(row)
    failures = [r for rs in records.values() for r in rs if not r.ok]
    for r in failures:
        print(f"\nFAILED {r.framework} {r.pool}: {r.error}\n{r.output_tail or ''}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
