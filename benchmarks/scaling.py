"""The scaling curve: throughput and latency as concurrency and the number of workers grow.

    python3 dev.py bench scaling                  # Redis, the sizes below, about 5 minutes
    python3 dev.py bench scaling --quick          # tiny sizes, under a minute
    python3 dev.py bench scaling --help

Two sweeps, millpond only, on one broker (Redis by default), in one session:

* pools: threads, gevent and asyncio at concurrency 1, 10, 100 and 1000 on one worker. Each point
  is the harness's own no-op drain with idle-worker latency probes after it (p50, p99), and a drain
  of 10 ms sleeps, where concurrency is what counts (the bound is concurrency / 10 ms). asyncio
  sleeps with `bench.async_sleep`, a coroutine, since a blocking sleep would run in its executor.
* workers: 1, 2, 4 and 8 solo workers on one queue. Each worker takes a `bench.gate` task that
  holds it until all have reported (as many gates a worker as its prefetch window, so no
  tick loaded next is taken early); the queue is then loaded behind the gates and they are
  released together, so every worker starts on a full queue. Every task is a `bench.tick` that
  reports when it ended (several workers have no single last task), so the "no-op" here costs one
  side-channel RPUSH per task: compare the points with each other, not with the drain table.

Results go to benchmarks/results/scaling-<timestamp>.json and the picture to docs/scaling.png
(matplotlib, headless). Sizes: `--tasks` no-ops per point, sleeps per point grow with the bound
(two seconds' worth, between 200 and `--sleep-tasks`), `--latency-samples` probes per point.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks import brokers  # noqa: E402
from benchmarks.model import MILLPOND, Combo, Record, RunFailed  # noqa: E402
from benchmarks.producers import producer  # noqa: E402
from benchmarks.scenarios import Context, drain_and_latency, latency_figures, sleep_drain  # noqa: E402
from benchmarks.side import DEFAULT_URL, SideChannel  # noqa: E402
from benchmarks.workers import WorkerProcess, environment, millpond_command  # noqa: E402
from millpond_pool_solo import SoloPool  # noqa: E402

POOLS = ("threads", "gevent", "asyncio")
CONCURRENCY = (1, 10, 100, 1000)
WORKERS = (1, 2, 4, 8)
SLEEP_S = 0.01
#: messages a solo worker holds unacknowledged: the solo pool's default prefetch multiplier x 1
PREFETCH = SoloPool.default_prefetch_multiplier or 4
RESULTS = ROOT / "benchmarks" / "results"
PNG = ROOT / "docs" / "scaling.png"


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one number, each at least 1")
    return values


def _pools(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in POOLS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"choose pools from {', '.join(POOLS)}")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench scaling", description="Throughput and latency as concurrency and workers grow."
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--broker", choices=("redis", "amqp"), default="redis", help="(redis)")
    p.add_argument("--pools", type=_pools, default=list(POOLS), help="threads,gevent,asyncio")
    p.add_argument("--concurrency", type=_ints, default=list(CONCURRENCY), help="1,10,100,1000")
    p.add_argument("--workers", type=_ints, default=list(WORKERS), help="1,2,4,8")
    p.add_argument("--tasks", type=int, help="no-ops per point (5000; quick 100)")
    p.add_argument("--sleep-tasks", type=int, help="most 10 ms sleeps per point (6000; quick 50)")
    p.add_argument("--latency-samples", type=int, help="probes per point (50; quick 5)")
    p.add_argument("--timeout", type=float, help="seconds a point may take (90; quick 30)")
    p.add_argument("--grace", type=float, default=10.0, help="SIGTERM to SIGKILL (10)")
    p.add_argument("--redis-db", type=int, default=13, help="Redis database under test (13)")
    p.add_argument("--side-url", default=DEFAULT_URL, help=f"side-channel Redis ({DEFAULT_URL})")
    p.add_argument("--out", type=Path, help="results JSON (benchmarks/results/scaling-<ts>.json)")
    p.add_argument("--png", type=Path, default=PNG, help="the plot (docs/scaling.png)")
    return p


def settle(ns: argparse.Namespace) -> None:
    q = ns.quick
    ns.tasks = ns.tasks if ns.tasks is not None else (100 if q else 5000)
    ns.sleep_tasks = ns.sleep_tasks if ns.sleep_tasks is not None else (50 if q else 6000)
    ns.latency_samples = ns.latency_samples if ns.latency_samples is not None else (5 if q else 50)
    ns.timeout = ns.timeout if ns.timeout is not None else (30.0 if q else 90.0)
    if min(ns.tasks, ns.sleep_tasks) < 1 or ns.latency_samples < 0 or ns.timeout <= 0:
        raise SystemExit("bench scaling: --tasks and --sleep-tasks >= 1, --timeout > 0")


def sleep_count(concurrency: int, most: int) -> int:
    """Two seconds' worth of sleeps at the bound, between min(200, most) and `most`."""
    return max(min(200, most), min(most, int(2 * concurrency / SLEEP_S)))


@dataclass(slots=True)
class Point:
    """One point of a curve: a sweep, a pool, its x (concurrency or workers) and the figures."""

    sweep: str  # "pools" or "workers"
    pool: str
    x: int
    ok: bool = True
    noop_tps: float | None = None
    sleep_tps: float | None = None
    sleep_bound: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_ms_per_task: float | None = None
    errors: list[str] = field(default_factory=list)

    def note(self, what: str, record: Record) -> None:
        if not record.ok:
            self.ok = False
            self.errors.append(f"{what}: {record.error}")


# -- the pools sweep: the harness's own scenarios at each concurrency ------------------------------


def pool_point(
    ctx: Context, target: brokers.Target, pool: str, conc: int, ns: argparse.Namespace
) -> Point:
    combo = Combo(target.name, pool, conc)
    point = Point("pools", pool, conc, sleep_bound=conc / SLEEP_S)
    for rec in drain_and_latency(ctx, MILLPOND, combo, target, 0, ns.tasks, ns.latency_samples):
        point.note(rec.scenario, rec)
        if rec.ok and rec.scenario == "drain":
            point.noop_tps = rec.value
            point.cpu_ms_per_task = rec.metrics.get("cpu_ms_per_task")
        elif rec.ok and rec.scenario == "latency":
            point.p50_ms, point.p99_ms = rec.value, rec.metrics.get("p99_ms")
    task = "bench.async_sleep" if pool == "asyncio" else "bench.sleep"
    n = sleep_count(conc, ns.sleep_tasks)
    rec = sleep_drain(ctx, MILLPOND, combo, target, 0, n, SLEEP_S, task)
    point.note("sleep", rec)
    if rec.ok:
        point.sleep_tps = rec.value
    return point


# -- the workers sweep: N solo workers on one queue, started together behind gates -----------------


class Fleet:
    """N millpond solo workers consuming one queue, with a producer and a side channel."""

    def __init__(self, ctx: Context, target: brokers.Target, n: int) -> None:
        self.ctx, self.target, self.n = ctx, target, n
        self.queue = f"bench-scale-{uuid.uuid4().hex[:10]}"
        self.producer = producer(MILLPOND, target.url, queue=self.queue)
        self.workers: list[WorkerProcess] = []
        self.drains = 0

    def __enter__(self) -> Fleet:
        env = environment(MILLPOND, self.target.url, self.ctx.side.url, self.ctx.run_dir)
        argv = millpond_command(Combo(self.target.name, "solo", 1), self.queue)
        for i in range(self.n):
            log = self.ctx.run_dir / f"scale-{self.n}-{i}-{self.queue}.log"
            self.workers.append(WorkerProcess(argv, env, log))
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.producer.close()
        finally:
            for w in self.workers:
                w.stop(self.ctx.grace)
            brokers.cleanup(self.target, self.queue, MILLPOND)

    def problem(self) -> str | None:
        for i, w in enumerate(self.workers):
            trouble = w.problem()
            if trouble:
                return f"worker {i + 1} of {self.n}: {trouble}\n{w.tail()}"
        return None

    def cpu_seconds(self) -> float:
        return sum(w.cpu_seconds() for w in self.workers)

    def drain(self, n: int, seconds: float, deadline: float) -> tuple[float, float]:
        """Hold every worker at a gate, load `n` ticks, release: (tasks/s, CPU ms per task)."""
        side = self.ctx.side
        # Keys of this drain only, and its release is never deleted: a worker that fell behind
        # may still run gates of the previous drain after its ticks are done, and those must
        # neither hold it (a deleted release would, for minutes) nor report into this drain.
        self.drains += 1
        held, release, done = (
            side.key(f"{k}-{self.queue}-{self.drains}") for k in ("held", "release", "done")
        )
        # A worker holds up to PREFETCH messages: with that many gates each, every window is
        # full once each worker is running one, so the ticks wait in the queue until the release.
        for _ in range(self.n * PREFETCH):
            self.producer.send("bench.gate", (held, release))
        pids: set[bytes] = set()
        while len(pids) < self.n:
            what = f"a gate in each of {self.n} workers ({len(pids)} so far)"
            pids.add(side.wait_raw(held, deadline, self.problem, what))
        for _ in range(n):
            self.producer.send("bench.tick", (done, seconds))
        cpu0 = self.cpu_seconds()
        side.client.set(release, b"1", ex=300)
        released = time.time()
        while side.client.llen(done) < n:
            if time.monotonic() > deadline:
                got = side.client.llen(done)
                raise RunFailed(f"timed out: {got} of {n} ticks done")
            trouble = self.problem()
            if trouble:
                raise RunFailed(trouble)
            time.sleep(0.005)  # polling a counter, not synchronising: the loop is bounded above
        cpu_ms = (self.cpu_seconds() - cpu0) * 1000.0
        last = max(float(v) for v in side.client.lrange(done, 0, -1))
        side.client.delete(done, held)
        return n / max(last - released, 1e-9), cpu_ms / n

    def latency(self, samples: int, deadline: float) -> dict[str, Any]:
        key = self.ctx.side.key("latency")
        values = []
        for i in range(samples + 1):  # the first is a warm-up
            self.producer.send("bench.latency", (key, time.time()))
            took = self.ctx.side.wait(key, deadline, self.problem, f"latency probe {i}")
            if i:
                values.append(took * 1000.0)
        return latency_figures(values)


def worker_point(ctx: Context, target: brokers.Target, n: int, ns: argparse.Namespace) -> Point:
    point = Point("workers", "solo", n, sleep_bound=n / SLEEP_S)
    try:
        with Fleet(ctx, target, n) as fleet:
            deadline = time.monotonic() + ns.timeout
            point.noop_tps, point.cpu_ms_per_task = fleet.drain(ns.tasks, 0.0, deadline)
            sleeps = sleep_count(n, ns.sleep_tasks)
            point.sleep_tps, _ = fleet.drain(sleeps, SLEEP_S, deadline + ns.timeout)
            if ns.latency_samples:
                lat = fleet.latency(ns.latency_samples, deadline + 2 * ns.timeout)
                point.p50_ms, point.p99_ms = lat["p50_ms"], lat["p99_ms"]
    except Exception as exc:
        point.ok = False
        point.errors.append(
            str(exc) if isinstance(exc, RunFailed) else f"{type(exc).__name__}: {exc}"
        )
    return point


# -- the picture and the summary --------------------------------------------------------------------


def plot(points: list[Point], png: Path, title: str) -> None:
    """Four panels: no-op and 10 ms-sleep throughput, p50 and p99 latency, against x (log)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on a server or in CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    panels = [
        (axes[0][0], "noop_tps", "no-op tasks/s"),
        (axes[0][1], "sleep_tps", "10 ms sleeps, tasks/s (dotted: the bound)"),
        (axes[1][0], "p50_ms", "latency p50, ms (idle worker)"),
        (axes[1][1], "p99_ms", "latency p99, ms (idle worker)"),
    ]
    curves: dict[str, list[Point]] = {}
    for p in points:
        label = (
            f"{p.pool} (concurrency)"
            if p.sweep == "pools"
            else "solo workers, one queue (each task also RPUSHes)"
        )
        curves.setdefault(label, []).append(p)
    for ax, attr, ylabel in panels:
        for label, ps in curves.items():
            xs = [p.x for p in ps if getattr(p, attr) is not None]
            ys = [getattr(p, attr) for p in ps if getattr(p, attr) is not None]
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
        if attr == "sleep_tps":
            xs = sorted({p.x for p in points})
            ax.plot(xs, [x / SLEEP_S for x in xs], ":", color="grey", label="bound")
        ax.set_xscale("log")
        if attr.endswith("_tps"):  # throughput spans decades; latency reads better linear
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrency, or number of workers")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(points: list[Point]) -> str:
    head = [
        "sweep",
        "pool",
        "x",
        "no-op tasks/s",
        "CPU ms/task",
        "10 ms sleeps tasks/s",
        "bound",
        "p50 ms",
        "p99 ms",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        lines.append(
            f"| {p.sweep} | {p.pool} | {p.x} | {_fmt(p.noop_tps, ',.0f')} | "
            f"{_fmt(p.cpu_ms_per_task, '.3f')} | {_fmt(p.sleep_tps, ',.0f')} | "
            f"{_fmt(p.sleep_bound, ',.0f')} | {_fmt(p.p50_ms, '.2f')} | {_fmt(p.p99_ms, '.2f')} |"
            + ("" if p.ok else " FAILED: " + "; ".join(p.errors)[:200])
        )
    return "\n".join(lines) + "\n"


def run(ns: argparse.Namespace, ctx: Context, target: brokers.Target, out: Path) -> list[Point]:
    """Every point in order, saving the JSON after each (an interrupted run keeps what it has)."""
    points: list[Point] = []
    meta = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "broker": target.name,
        "tasks": ns.tasks,
        "sleep_tasks": ns.sleep_tasks,
        "latency_samples": ns.latency_samples,
        "sleep_seconds": SLEEP_S,
    }
    began = time.monotonic()
    plan: list[tuple[str, str, int]] = [("pools", p, c) for p in ns.pools for c in ns.concurrency]
    plan += [("workers", "solo", n) for n in ns.workers]
    for sweep, pool, x in plan:
        point = (
            pool_point(ctx, target, pool, x, ns)
            if sweep == "pools"
            else worker_point(ctx, target, x, ns)
        )
        points.append(point)
        status = "ok" if point.ok else "FAILED: " + "; ".join(point.errors)[:300]
        print(
            f"[scaling] {sweep} {pool} {x}: no-op {_fmt(point.noop_tps, ',.0f')}/s, sleeps "
            f"{_fmt(point.sleep_tps, ',.0f')}/s, p50 {_fmt(point.p50_ms, '.2f')} ms, "
            f"p99 {_fmt(point.p99_ms, '.2f')} ms ({status})",
            file=sys.stderr,
            flush=True,
        )
        meta["wall_s"] = round(time.monotonic() - began, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "points": [_asdict(p) for p in points]}, indent=1))
    return points


def _asdict(p: Point) -> dict[str, Any]:
    return asdict(p)


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    settle(ns)
    side = SideChannel(ns.side_url)
    problem = side.check()
    if problem:
        print(f"bench scaling: {problem}", file=sys.stderr)
        return 2
    run_dir = Path(tempfile.mkdtemp(prefix="millpond-scaling-"))
    target = brokers.target(ns.broker, run_dir, ns.redis_db)
    trouble = target.check()
    if trouble:
        print(f"bench scaling: {ns.broker}: {trouble}", file=sys.stderr)
        return 2
    out = ns.out or RESULTS / f"scaling-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    ctx = Context(side=side, run_dir=run_dir, timeout=ns.timeout, grace=ns.grace)
    try:
        points = run(ns, ctx, target, out)
    finally:
        side.close()
        brokers.remove_dir(run_dir)
    title = (
        f"millpond on {ns.broker}, {os.cpu_count()} CPUs: {ns.tasks} no-ops, up to "
        f"{ns.sleep_tasks} 10 ms sleeps, {ns.latency_samples} latency probes per point"
    )
    plot(points, ns.png, title)
    print(markdown(points), end="")
    print(f"\nresults: {out}\nplot: {ns.png}", file=sys.stderr)
    return 0 if points and all(p.ok for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
