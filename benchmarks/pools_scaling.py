"""How the threads and prefork pools scale, measured at the pool itself (no broker in the way).

    .venv/bin/python benchmarks/pools_scaling.py [--rounds 3] [--cpu-tasks 20] [--io-tasks 200]
                                                 [--noop-tasks 2000] [--timeout 300]

Each scenario feeds a started pool the way the worker does (a job only while a unit is free, the
pool kit's `Runner`) and times the wall clock from the first hand-over to the last outcome; rounds
are interleaved so machine noise hits every configuration alike, and the median is printed. Each
pool is built as the worker builds it (`pool_class(concurrency, on_complete, execution=...)`),
handed the pool kit's `Executor` for this script's app (`kit_executor`: the tracing and
log-context hooks, what a pool runs with when no worker is around).

* ceiling: the same CPU work split over 1 and 2 bare forked processes, no pool: on a shared
  machine this says how much of a second core was really there during the run;
* cpu: tasks doing a fixed amount of pure-Python work (~100 ms each on one core), prefork with 1
  and 2 children (the speed-up is what processes buy on a 2-core machine), and threads with 2
  threads for contrast (the GIL serialises them);
* io: tasks that sleep 10 ms (one `time.sleep`, like a network wait), threads 1, 4 and 16;
* overhead: no-op tasks (`kit.add`), to show what moving a job costs in each pool.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from millpond.consume.execute import Executor
from millpond.contracts.pool import BasePool, Outcome
from millpond.produce.app import Millpond
from millpond.states import TaskState
from millpond.testing import tasks
from millpond.testing.pool_kit import Outcomes, Runner, kit_executor, make_job
from millpond_pool_prefork import PreforkPool
from millpond_pool_threads import ThreadPool

#: the kit's tasks (`kit.work`, `kit.add`) and `bench.io`; no broker: jobs go straight to a pool
app = tasks.register(Millpond("millpond-pools-bench"))


@app.task(name="bench.io")  # registered before any fork: prefork's children have it
def io_wait(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def calibrate(target: float) -> int:
    """Iterations of `kit.work` that take about `target` seconds on one core here."""
    n = 200_000
    best = float("inf")
    for _ in range(5):  # the fastest of a few runs: the least disturbed by other processes
        started = time.perf_counter()
        tasks.work(n)
        best = min(best, time.perf_counter() - started)
    return max(1, int(target / (best / n)))


def check(results: list[Outcome]) -> None:
    bad = [o for o in results if o.state != TaskState.SUCCESS]
    if bad:
        raise RuntimeError(f"{len(bad)} jobs failed, e.g. {bad[0]}")


def timed(
    make: Callable[[Outcomes], BasePool],
    name: str,
    args: tuple[object, ...],
    count: int,
    timeout: float,
) -> float:
    """Seconds to run `count` jobs of `name` through a fresh pool (start/stop not timed)."""
    outcomes = Outcomes()
    pool = make(outcomes)
    pool.start()
    try:
        runner = Runner(pool, outcomes, timeout)
        # every unit up and through one job first (cheap ones, so the warm-up costs no time)
        check(runner.run_all([make_job("kit.add", 0, 0) for _ in range(2 * pool.concurrency)]))
        jobs = [make_job(name, *args) for _ in range(count)]
        started = time.perf_counter()
        results = runner.run_all(jobs)
        elapsed = time.perf_counter() - started
        check(results)
        return elapsed
    finally:
        pool.stop(30)


def bare(processes: int, iterations: int, count: int) -> float:
    """The ceiling: `count` tasks' work split over plain forked processes, no pool at all."""
    import multiprocessing

    def share(n: int) -> None:
        for _ in range(n):
            tasks.work(iterations)

    ctx = multiprocessing.get_context("fork")
    shares = [count // processes + (i < count % processes) for i in range(processes)]
    started = time.perf_counter()
    workers = [ctx.Process(target=share, args=(n,)) for n in shares]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu-tasks", type=int, default=20)
    parser.add_argument("--io-tasks", type=int, default=200)
    parser.add_argument("--noop-tasks", type=int, default=2000)
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds one scenario's jobs may take"
    )
    ns = parser.parse_args(argv)
    iterations = calibrate(0.100)
    execution: Executor = kit_executor(app)

    def prefork(n: int) -> Callable[[Outcomes], BasePool]:
        return lambda outcomes: PreforkPool(n, outcomes, execution=execution)

    def threads(n: int) -> Callable[[Outcomes], BasePool]:
        return lambda outcomes: ThreadPool(n, outcomes, execution=execution)

    scenarios: list[
        tuple[str, str, Callable[[Outcomes], BasePool], str, tuple[object, ...], int]
    ] = [
        ("cpu", "prefork -c 1", prefork(1), "kit.work", (iterations,), ns.cpu_tasks),
        ("cpu", "prefork -c 2", prefork(2), "kit.work", (iterations,), ns.cpu_tasks),
        ("cpu", "threads -c 2", threads(2), "kit.work", (iterations,), ns.cpu_tasks),
        ("io", "threads -c 1", threads(1), "bench.io", (0.010,), ns.io_tasks),
        ("io", "threads -c 4", threads(4), "bench.io", (0.010,), ns.io_tasks),
        ("io", "threads -c 16", threads(16), "bench.io", (0.010,), ns.io_tasks),
        ("overhead", "threads -c 4", threads(4), "kit.add", (1, 1), ns.noop_tasks),
        ("overhead", "prefork -c 2", prefork(2), "kit.add", (1, 1), ns.noop_tasks),
    ]
    times: dict[tuple[str, str], list[float]] = {(s[0], s[1]): [] for s in scenarios}
    ceiling: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(ns.rounds):
        for n, runs in ceiling.items():
            runs.append(bare(n, iterations, ns.cpu_tasks))
        for kind, label, make, name, args, count in scenarios:
            times[(kind, label)].append(timed(make, name, args, count, ns.timeout))
    print(f"median of {ns.rounds} rounds; cpu task = {iterations} iterations (~100 ms)")
    print(f"{'scenario':<10} {'pool':<15} {'tasks':>6} {'seconds':>8} {'tasks/s':>9}  note")
    base: dict[str, float] = {}
    for kind, label, _make, _name, _args, count in scenarios:
        seconds = statistics.median(times[(kind, label)])
        rate = count / seconds
        base.setdefault(kind, rate)
        note = (
            f"x{rate / base[kind]:.2f} vs first {kind} row"
            if kind != "overhead"
            else (f"{seconds / count * 1e6:.0f} us per task")
        )
        print(f"{kind:<10} {label:<15} {count:>6} {seconds:>8.3f} {rate:>9.1f}  {note}")
    one, two = (statistics.median(ceiling[n]) for n in (1, 2))
    print(
        f"ceiling: the same cpu work in 1 / 2 bare processes took {one:.3f} / {two:.3f} s "
        f"(x{one / two:.2f}): what this machine gave a second process during the run"
    )


if __name__ == "__main__":
    main()
