"""What sending Celery's monitoring events costs a worker: no-op throughput and CPU per task with
events off and on, millpond against Celery with `-E`, same broker, pool and machine, interleaved.

    .venv/bin/python benchmarks/events_overhead.py                 # Redis, RabbitMQ; threads 4
    .venv/bin/python benchmarks/events_overhead.py --broker redis --rounds 5 --tasks 5000
    .venv/bin/python benchmarks/events_overhead.py --report <results.json>

Each drain is a real worker subprocess on a fresh queue pre-loaded, by the framework's own
producer, with [start mark, N x bench.noop, end mark] (`benchmarks/events_tasks.py`); the marks
report the wall clock and the worker's own CPU time, so start-up and shutdown are not counted.
Configurations (`--configs`):

* `millpond-off`: `[events] enabled = false` (nothing sent, the events hooks out of the flow);
* `millpond-worker`: the default (worker-online, a heartbeat every 2 s, no task events);
* `millpond-on`: `millpond worker -E` (task events too);
* `celery-off`: `celery worker --without-heartbeat --without-gossip --without-mingle`;
* `celery-on`: `celery worker -E --without-gossip --without-mingle` (heartbeats and task events).

A monitor listens the whole time, as Flower would: Celery's own `EventReceiver` on a thread of
this process, counting each worker's events by type. For every `-on` drain the count is checked:
each task's received, started and succeeded event must have arrived, or the drain says how many
were missing (events that are dropped would make events look cheaper than they are).

The machine is shared and its speed drifts, so figures are compared within a round only: each round
runs every configuration once per (broker, pool), in an order rotated from round to round, and
the report gives medians of per-round ratios against the same framework's `-off` drain.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks import brokers  # noqa: E402
from benchmarks.model import MILLPOND, RunFailed  # noqa: E402
from benchmarks.producers import producer  # noqa: E402
from benchmarks.side import SideChannel  # noqa: E402
from benchmarks.workers import WorkerProcess, _command, environment  # noqa: E402

CONFIGS = ("millpond-off", "millpond-worker", "millpond-on", "celery-off", "celery-on")
TASK_EVENTS = ("task-received", "task-started", "task-succeeded")


@dataclass(slots=True)
class Drain:
    config: str
    broker: str
    pool: str
    concurrency: int
    round: int
    ok: bool = False
    tasks: int = 0
    rate: float | None = None  # tasks/s, start mark to end mark
    cpu_us: float | None = None  # worker CPU per task, µs
    events: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    tail: str | None = None

    @property
    def framework(self) -> str:
        return self.config.split("-", 1)[0]

    @property
    def key(self) -> tuple[str, str, int]:
        return self.broker, self.pool, self.concurrency


# -- the monitor ----------------------------------------------------------------------------------
class Monitor:
    """Celery's EventReceiver on a thread, counting (hostname, type)."""

    def __init__(self, url: str) -> None:
        from celery import Celery

        self.app = Celery("bench-monitor", broker=url)
        self.counts: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.app.connection() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def _on_event(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.counts[(event.get("hostname", ""), event["type"])] += 1

    def start(self, timeout: float = 30.0) -> Monitor:
        self.thread.start()
        deadline = time.monotonic() + timeout
        with self.app.connection() as conn:
            dispatcher = self.app.events.Dispatcher(conn, hostname="probe@bench")
            while not self.of("probe@bench"):
                if time.monotonic() > deadline:
                    raise SystemExit("the event monitor never saw its own probe event")
                dispatcher.send("probe-ready")
                time.sleep(0.2)  # the receiver subscribes on its own thread; poll the count
            dispatcher.close()
        return self

    def of(self, hostname: str) -> dict[str, int]:
        with self.lock:
            return {kind: n for (host, kind), n in self.counts.items() if host == hostname}

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(5)


# -- one drain -------------------------------------------------------------------------------------
def _argv(config: str, pool: str, concurrency: int, queue: str, hostname: str) -> list[str]:
    if config.startswith(MILLPOND):
        argv = [
            *_command("millpond"), "worker", "-A", "benchmarks.events_tasks:app", "-P", pool,
            "-c", str(concurrency), "-Q", queue, "-n", hostname, "-l", "WARNING", "--no-banner",
        ]  # fmt: skip
        return [*argv, "-E"] if config == "millpond-on" else argv
    argv = [
        *_command("celery"), "-A", "benchmarks.events_tasks:celery_app", "worker", "-P", pool,
        "-c", str(concurrency), "-Q", queue, "--without-mingle", "--without-gossip",
        "--prefetch-multiplier", "4", "-n", hostname, "-l", "WARNING",
    ]  # fmt: skip
    return [*argv, "-E"] if config == "celery-on" else [*argv, "--without-heartbeat"]


def run_drain(
    drain: Drain,
    args: argparse.Namespace,
    side: SideChannel,
    monitor: Monitor | None,
    run_dir: Path,
) -> Drain:
    target = brokers.target(drain.broker, run_dir, args.redis_db)
    framework = drain.framework
    queue = f"bench-ev-{uuid.uuid4().hex[:10]}"
    hostname = f"{queue}@bench"
    start_key, end_key = side.key("start"), side.key("end")
    worker: WorkerProcess | None = None
    try:
        prod = producer(framework, target.url, queue=queue)
        try:
            prod.send("bench.cpu_mark", (start_key,))
            for _ in range(args.tasks):
                prod.send("bench.noop")
            prod.send("bench.cpu_mark", (end_key,))
        finally:
            prod.close()
        env = environment(framework, target.url, side.url, run_dir)
        if drain.config == "millpond-off":
            env["MILLPOND_EVENTS__ENABLED"] = "false"
        elif framework == MILLPOND:
            env.update(args.millpond_env)
        argv = _argv(drain.config, drain.pool, drain.concurrency, queue, hostname)
        log = run_dir / f"{drain.config}-{drain.broker}-{drain.pool}-{drain.round}.log"
        worker = WorkerProcess(argv, env, log)
        deadline = time.monotonic() + args.timeout
        start = side.wait_json(start_key, deadline, worker.problem, "the start mark")
        end = side.wait_json(end_key, deadline, worker.problem, "the end mark")
        if start["pid"] != end["pid"]:
            raise RunFailed("the marks ran in different processes: CPU times do not compare")
        drain.tasks = args.tasks
        drain.rate = args.tasks / max(end["wall"] - start["wall"], 1e-9)
        drain.cpu_us = (end["cpu"] - start["cpu"]) / args.tasks * 1e6
        expected = args.tasks + 2
        if monitor is not None and drain.config.endswith("-on"):
            settle = time.monotonic() + 15  # events sent after the end mark ran, in flight
            while time.monotonic() < settle:
                seen = monitor.of(hostname)
                if all(seen.get(kind, 0) >= expected for kind in TASK_EVENTS):
                    break
                time.sleep(0.1)  # polling a counter another thread fills; bounded above
        outcome = worker.stop(args.grace)
        if outcome["killed"]:
            raise RunFailed(f"the worker did not stop within {args.grace:g} s of SIGTERM")
        if monitor is not None:
            drain.events = monitor.of(hostname)
        if monitor is None:
            pass
        elif drain.config.endswith("-on"):
            missing = {
                kind: expected - drain.events.get(kind, 0)
                for kind in TASK_EVENTS
                if drain.events.get(kind, 0) < expected
            }
            if missing:
                raise RunFailed(f"the monitor missed task events: {missing} of {expected} each")
        elif any(kind.startswith("task-") for kind in drain.events):
            raise RunFailed(f"task events sent with events off: {drain.events}")
        drain.ok = True
    except Exception as exc:
        drain.error = str(exc) if isinstance(exc, RunFailed) else f"{type(exc).__name__}: {exc}"
        if worker is not None:
            worker.stop(args.grace)
            drain.tail = worker.tail()
    finally:
        brokers.cleanup(target, queue)
    return drain


# -- the report ------------------------------------------------------------------------------------
def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(drains: list[Drain]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for key in sorted({d.key for d in drains}, key=lambda k: (k[0] != "redis", k)):
        mine = [d for d in drains if d.key == key]
        by_round: dict[int, dict[str, Drain]] = {}
        for d in mine:
            if d.ok:
                by_round.setdefault(d.round, {})[d.config] = d
        for config in [c for c in CONFIGS if any(d.config == c for d in mine)]:
            ok = [d for d in mine if d.config == config and d.ok]
            off_name = f"{config.split('-', 1)[0]}-off"
            ratio, added, vs_celery = [], [], []
            for same_round in by_round.values():
                this, off = same_round.get(config), same_round.get(off_name)
                if this and off and this.rate and off.rate:
                    ratio.append(this.rate / off.rate)
                    if this.cpu_us is not None and off.cpu_us is not None:
                        added.append(this.cpu_us - off.cpu_us)
                celery_on = same_round.get("celery-on")
                if config == "millpond-on" and this and celery_on and this.rate and celery_on.rate:
                    vs_celery.append(this.rate / celery_on.rate)
            events_per_task = [
                sum(n for k, n in d.events.items() if k.startswith("task-")) / max(d.tasks, 1)
                for d in ok
            ]
            rows.append(
                {
                    "broker": key[0],
                    "pool": key[1],
                    "concurrency": key[2],
                    "config": config,
                    "runs": len(ok),
                    "failed": sum(1 for d in mine if d.config == config and not d.ok),
                    "rate": _median([d.rate for d in ok if d.rate]),
                    "cpu_us": _median([d.cpu_us for d in ok if d.cpu_us is not None]),
                    "ratio": _median(ratio),
                    "added_us": _median(added),
                    "vs_celery_on": _median(vs_celery),
                    "events_per_task": _median(events_per_task),
                }
            )
    return rows


def report(data: dict[str, Any]) -> str:
    drains = [Drain(**d) for d in data["drains"]]
    meta = data["meta"]
    out = [
        f"{meta['date']}, {meta['machine']}; Python {meta['python']}; {meta['versions']}",
        f"{meta['tasks']} no-op tasks per drain, {meta['rounds']} interleaved rounds, "
        + ("a Celery EventReceiver listening" if meta.get("monitor", True) else "nobody listening")
        + "; medians; 'vs off' and '+CPU' are medians of per-round ratios "
        "and differences against the same framework's events-off drain of that round",
        "",
        "| broker | pool | configuration | tasks/s | vs off | CPU µs/task | +CPU µs/task "
        "| task events/task |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    rows = summarize(drains)
    for row in rows:
        broker = {"amqp": "RabbitMQ", "redis": "Redis"}.get(row["broker"], row["broker"])
        cells = [
            broker,
            f"{row['pool']} {row['concurrency']}",
            row["config"] + (f" ({row['failed']} failed)" if row["failed"] else ""),
            f"{row['rate']:,.0f}" if row["rate"] else "-",
            f"{row['ratio']:.2f}" if row["ratio"] is not None else "-",
            f"{row['cpu_us']:.0f}" if row["cpu_us"] is not None else "-",
            f"{row['added_us']:+.0f}"
            if row["added_us"] is not None and not row["config"].endswith("-off")
            else "",
            f"{row['events_per_task']:.2f}" if row["events_per_task"] is not None else "-",
        ]
        out.append("| " + " | ".join(cells) + " |")
    targets = [r for r in rows if r["config"] == "millpond-on" and r["ratio"] is not None]
    if targets:
        out.append("")
        out.append("Target: events on cost at most 15 % of no-op throughput (millpond -E vs off):")
        for row in targets:
            cost = 1 - row["ratio"]
            verdict = "met" if cost <= 0.15 else "MISSED"
            against = (
                f"; millpond -E vs Celery -E throughput {row['vs_celery_on']:.2f}x"
                if row["vs_celery_on"]
                else ""
            )
            out.append(
                f"- {row['broker']} {row['pool']} {row['concurrency']}: costs {cost:.0%} "
                f"({verdict}){against}"
            )
    failures = [d for d in drains if not d.ok]
    if failures:
        out.append("")
        out.append("Failed drains:")
        for d in failures:
            out.append(f"- {d.config} {d.broker} {d.pool} round {d.round}: {d.error}")
    return "\n".join(out)


def _versions() -> str:
    from importlib import metadata

    found = []
    for name in ["millpond", "celery", "kombu", "redis", "amqp"]:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default="redis,amqp", help="comma-separated: redis, amqp")
    parser.add_argument("--pool", default="threads:4", help="comma-separated pool[:concurrency]")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--grace", type=float, default=15.0)
    parser.add_argument("--redis-db", type=int, default=13)
    parser.add_argument("--report", type=Path, help="print the report of a saved run and exit")
    parser.add_argument(
        "--no-monitor",
        action="store_true",
        help="no event receiver listening: what sending costs alone (events are not counted)",
    )
    parser.add_argument(
        "--millpond-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the millpond workers with events, e.g. MILLPOND_EVENTS__BATCH=500",
    )
    args = parser.parse_args()
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return 0
    args.millpond_env = dict(item.split("=", 1) for item in args.millpond_env)
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; choose from {', '.join(CONFIGS)}")
    pools = []
    for spec in args.pool.split(","):
        name, _, conc = spec.partition(":")
        pools.append((name, int(conc or 4)))
    side = SideChannel()
    if (problem := side.check()) is not None:
        raise SystemExit(problem)
    run_dir = Path(tempfile.mkdtemp(prefix="millpond-bench-events-"))
    results = ROOT / "benchmarks" / "results" / f"events-{time.strftime('%Y%m%d-%H%M%S')}.json"
    results.parent.mkdir(exist_ok=True)
    data: dict[str, Any] = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(),
            "versions": _versions(),
            "tasks": args.tasks,
            "rounds": args.rounds,
            "millpond_env": args.millpond_env,
            "monitor": not args.no_monitor,
        },
        "drains": [],
    }
    for broker_name in args.broker.split(","):
        target = brokers.target(broker_name, run_dir, args.redis_db)
        if (problem := target.check()) is not None:
            print(f"skipping {broker_name}: {problem}")
            continue
        monitor = None if args.no_monitor else Monitor(target.url).start()
        try:
            for round_no in range(args.rounds):
                order = configs[round_no % len(configs) :] + configs[: round_no % len(configs)]
                for pool, concurrency in pools:
                    for config in order:
                        drain = Drain(config, broker_name, pool, concurrency, round_no)
                        run_drain(drain, args, side, monitor, run_dir)
                        shown = (
                            f"{drain.rate:,.0f}/s, {drain.cpu_us:.0f} µs CPU/task"
                            if drain.ok and drain.rate and drain.cpu_us is not None
                            else f"FAILED: {drain.error}"
                        )
                        print(
                            f"round {round_no} {broker_name} {pool} {config}: {shown}", flush=True
                        )
                        data["drains"].append(asdict(drain))
                        results.write_text(json.dumps(data, indent=1))
        finally:
            if monitor is not None:
                monitor.stop()
    print()
    print(report(data))
    print(f"\nresults: {results}")
    brokers.remove_dir(run_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
