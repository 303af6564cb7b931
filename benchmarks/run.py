"""millpond against Celery and Dramatiq: same broker, same pool, same machine, same session, interleaved.

    python3 dev.py bench                      # everything, medians of 3 (about half an hour)
    python3 dev.py bench --quick              # small N, one repeat: a couple of minutes
    python3 dev.py bench --broker redis --pool solo,threads:8 --framework millpond
    python3 dev.py bench --profile --broker sqlite --pool solo     # cProfile the worker
    python3 dev.py bench --report benchmarks/results/<file>.json   # re-print a saved run
    python3 dev.py bench --targets            # the issue-24 run: every target, + scaling curve

For each repeat, for each broker, for each pool: millpond and Celery run back to back (the order
alternates between repeats), so machine noise hits both alike; docs/benchmarks.md has the method.
Every run is bounded by --timeout; a run that fails is recorded with the worker's output tail and
the harness moves on. Results go to benchmarks/results/<timestamp>.json as they come in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks import baselines, brokers, profiling, raw_latency, report, scaling  # noqa: E402
from benchmarks.model import (  # noqa: E402
    CELERY,
    DEFAULT_CONCURRENCY,
    DRAMATIQ,
    DRAMATIQ_POOLS,
    FRAMEWORKS,
    MILLPOND,
    Combo,
    Record,
)
from benchmarks.scenarios import Context, drain_and_latency, memory_run, sleep_drain  # noqa: E402
from benchmarks.side import DEFAULT_URL, SideChannel  # noqa: E402

SCENARIOS = ("drain", "latency", "sleep", "memory", "baseline")
#: the pools the memory scenario reads (at rest, before and after a drain)
MEMORY_POOLS = ("solo", "prefork")
#: the brokers Dramatiq ships
DRAMATIQ_BROKERS = ("redis", "amqp")
RESULTS = ROOT / "benchmarks" / "results"

#: what `--targets` selects: every figure of the target table (report.targets_table), on both
#: brokers issue 24 names, every pool at the concurrency it names, all three frameworks
TARGET_PRESET: dict[str, Any] = {
    "broker": ["redis", "amqp"],
    "pool": "solo,threads:16,prefork:2,gevent:100,eventlet:100,asyncio:100",
    "framework": list(FRAMEWORKS),
    "scenario": list(SCENARIOS),
}


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


#: pools Celery has no counterpart of (`async def` tasks natively on an event loop)
_MILLPOND_ONLY_POOLS = frozenset({"asyncio"})


def parse_pools(text: str) -> list[tuple[str, int]]:
    """`solo,threads:8` -> [("solo", 1), ("threads", 8)]; unknown pools need a concurrency."""
    out = []
    for item in _csv(text):
        name, _, conc = item.partition(":")
        if conc:
            try:
                value = int(conc)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"concurrency in {item!r} is not a whole number; write e.g. threads:16"
                ) from None
        elif name in DEFAULT_CONCURRENCY:
            value = DEFAULT_CONCURRENCY[name]
        else:
            raise argparse.ArgumentTypeError(
                f"no default concurrency for pool {name!r}; give one, e.g. {name}:8"
            )
        if value < 1:
            raise argparse.ArgumentTypeError(f"concurrency in {item!r} must be at least 1")
        out.append((name, value))
    if not out:
        raise argparse.ArgumentTypeError("--pool needs at least one pool, e.g. --pool solo")
    return out


def _choices(allowed: tuple[str, ...], what: str) -> Any:
    def parse(text: str) -> list[str]:
        items = _csv(text)
        bad = [i for i in items if i not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)} "
                "(comma-separated)"
            )
        return items

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench",
        description="Benchmark millpond against Celery on the same broker, pool and machine.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a fast pass: 500 no-ops, 200 sleeps, 30 latency probes, 1 repeat",
    )
    p.add_argument(
        "--broker",
        type=_choices(brokers.BROKERS, "broker"),
        default=list(brokers.DEFAULT_BROKERS),
        help="sqlite,redis,amqp,sqs,filesystem,postgres (default: sqlite,redis,amqp; sqs starts a "
        "moto server, postgres a private PostgreSQL)",
    )
    p.add_argument(
        "--pool",
        type=parse_pools,
        default=parse_pools("solo,threads,prefork,gevent,eventlet"),
        help="pools as name[:concurrency], comma-separated "
        "(default: solo,threads:16,prefork:2,gevent:100,eventlet:100)",
    )
    p.add_argument(
        "--framework",
        type=_choices(FRAMEWORKS, "framework"),
        default=list(FRAMEWORKS),
        help="millpond,celery,dramatiq (default: all three; Dramatiq runs on redis and amqp with "
        "solo, threads, prefork and gevent only)",
    )
    p.add_argument(
        "--scenario",
        type=_choices(SCENARIOS, "scenario"),
        help="drain,latency,sleep,memory,baseline (default: all; with --profile: drain)",
    )
    p.add_argument("--tasks", type=int, help="no-op tasks per drain (default 5000; quick 500)")
    p.add_argument("--sleep-tasks", type=int, help="10 ms tasks per run (default 1000; quick 200)")
    p.add_argument("--sleep-seconds", type=float, default=0.01, help="sleep per task (0.01)")
    p.add_argument(
        "--latency-samples", type=int, help="sequential latency probes (default 200; quick 30)"
    )
    p.add_argument("--repeats", type=int, help="interleaved repeats (default 3; quick 1)")
    p.add_argument(
        "--timeout",
        type=float,
        help="seconds one run may take after its worker starts (default 90; quick 30)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds a worker gets to stop after SIGTERM before SIGKILL (10)",
    )
    p.add_argument(
        "--redis-db", type=int, default=13, help="Redis database used as the broker under test (13)"
    )
    p.add_argument(
        "--side-url",
        default=DEFAULT_URL,
        help=f"Redis for the tasks' marks, whatever the broker ({DEFAULT_URL})",
    )
    p.add_argument(
        "--out", type=Path, help="results JSON (default benchmarks/results/<timestamp>.json)"
    )
    p.add_argument("--markdown", type=Path, help="also write the markdown report here")
    p.add_argument(
        "--report",
        type=Path,
        metavar="RESULTS_JSON",
        help="print the report of a saved results file and exit",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="run millpond drains under cProfile and print the top costs per task",
    )
    p.add_argument("--keep", action="store_true", help="keep worker logs (and profiles)")
    p.add_argument(
        "--targets",
        action="store_true",
        help="the issue-24 run: redis,amqp x solo,threads:16,prefork:2,gevent:100,eventlet:100,"
        "asyncio:100 x all frameworks x every scenario, then the scaling curve (benchmarks/"
        "scaling.py); writes a markdown section for docs/benchmarks.md. Overrides --broker, "
        "--pool, --framework and --scenario; the sizes (--quick, --tasks, --repeats...) still "
        "apply. About 20 minutes at the defaults",
    )
    p.add_argument(
        "--scaling-png",
        type=Path,
        default=scaling.PNG,
        help="with --targets: where the scaling plot goes (docs/scaling.png)",
    )
    return p


def settle(ns: argparse.Namespace) -> None:
    """Fill the defaults that depend on --quick and --profile, and check the numbers."""
    quick = ns.quick
    if ns.targets:
        if ns.profile:
            raise SystemExit("bench: --targets and --profile do not go together")
        ns.broker = list(TARGET_PRESET["broker"])
        ns.pool = parse_pools(TARGET_PRESET["pool"])
        ns.framework = list(TARGET_PRESET["framework"])
        ns.scenario = list(TARGET_PRESET["scenario"])
    ns.tasks = ns.tasks if ns.tasks is not None else (500 if quick else 5000)
    ns.sleep_tasks = ns.sleep_tasks if ns.sleep_tasks is not None else (200 if quick else 1000)
    ns.latency_samples = (
        ns.latency_samples if ns.latency_samples is not None else (30 if quick else 200)
    )
    ns.repeats = ns.repeats if ns.repeats is not None else (1 if quick or ns.profile else 3)
    ns.timeout = ns.timeout if ns.timeout is not None else (30.0 if quick else 90.0)
    if ns.profile:
        ns.framework = [MILLPOND]
        ns.scenario = [s for s in ns.scenario or ["drain"] if s in ("drain", "sleep")] or ["drain"]
        ns.latency_samples = 0  # an idle worker's waits would swamp the profile
    elif ns.scenario is None:
        ns.scenario = list(SCENARIOS)
    for name in ("tasks", "sleep_tasks", "latency_samples"):
        if getattr(ns, name) < 0:
            raise SystemExit(f"bench: --{name.replace('_', '-')} cannot be negative")
    if ns.repeats < 1 or ns.timeout <= 0 or ns.grace < 0:
        raise SystemExit("bench: --repeats must be >= 1, --timeout > 0 and --grace >= 0")


def plugin_listing() -> str:
    """`millpond plugins`, for the record (which pools and brokers load in this environment)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "millpond", "plugins"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        return done.stdout + done.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"millpond plugins failed: {exc}"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("millpond", "celery", "dramatiq", "kombu", "redis", "amqp", "pika", "gevent"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def describe(r: Record) -> str:
    where = f"{r.scenario:<8} {r.broker:<6} {r.pool} {r.concurrency:<4} {r.framework:<17}"
    if not r.ok:
        return f"{where} FAILED: {r.error}"
    m = r.metrics
    if r.scenario == "latency":
        return f"{where} p50 {r.value:.2f} ms, p99 {m.get('p99_ms', 0):.2f} ms"
    if r.scenario == "memory":
        return f"{where} RSS {m['rss_up_mib']:.1f} MiB up, {m['rss_after_mib']:.1f} MiB after"
    extra = ""
    if "startup_s" in m:
        extra = f" (start {m['startup_s']:.2f} s, peak RSS {m.get('peak_rss_mib', 0):.0f} MiB)"
    return f"{where} {r.value:,.0f} tasks/s{extra}"


class Session:
    """One harness invocation: runs everything in order and keeps the results file current."""

    def __init__(self, ns: argparse.Namespace, out: Path) -> None:
        self.ns = ns
        self.out = out
        self.records: list[Record] = []
        self.meta: dict[str, Any] = {
            "argv": sys.argv[1:],
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "versions": _versions(),
            "repeats": ns.repeats,
            "tasks": ns.tasks,
            "sleep_tasks": ns.sleep_tasks,
            "sleep_seconds": ns.sleep_seconds,
            "latency_samples": ns.latency_samples,
            "timeout": ns.timeout,
            "redis_db": ns.redis_db,
        }

    def add(self, records: list[Record]) -> None:
        for r in records:
            self.records.append(r)
            print(f"[run {r.repeat + 1}] {describe(r)}", file=sys.stderr, flush=True)
        self.save()

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        data = {"meta": self.meta, "records": [r.to_json() for r in self.records]}
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.out)

    def run(self, ctx: Context, targets: list[brokers.Target]) -> None:
        ns = self.ns
        for repeat in range(ns.repeats):
            order = list(ns.framework) if repeat % 2 == 0 else list(reversed(ns.framework))
            for target in targets:
                if "baseline" in ns.scenario:
                    self.add(
                        baselines.run_baselines(
                            target, repeat, ns.tasks, ns.timeout, MILLPOND in ns.framework
                        )
                    )
                if (
                    "latency" in ns.scenario
                    and "baseline" in ns.scenario
                    and target.name in raw_latency.BROKERS
                    and ns.latency_samples
                ):
                    self.add([raw_latency.raw_latency(ctx, target, repeat, ns.latency_samples)])
                for pool, conc in ns.pool:
                    combo = Combo(target.name, pool, conc)
                    for framework in order:
                        if framework == CELERY and not target.celery:
                            continue  # Celery has no comparable transport (sqlite)
                        if framework == CELERY and pool in _MILLPOND_ONLY_POOLS:
                            continue  # compare with Celery's other pools in the same run
                        if framework == DRAMATIQ and (
                            target.name not in DRAMATIQ_BROKERS or pool not in DRAMATIQ_POOLS
                        ):
                            continue  # no Dramatiq broker or worker equivalent to compare
                        self._combo(ctx, framework, combo, target, repeat)

    def _combo(
        self, ctx: Context, framework: str, combo: Combo, target: brokers.Target, repeat: int
    ) -> None:
        ns = self.ns
        n = ns.tasks if "drain" in ns.scenario else 0
        samples = ns.latency_samples if "latency" in ns.scenario else 0
        if n or samples:
            self.add(drain_and_latency(ctx, framework, combo, target, repeat, n, samples))
        if "sleep" in ns.scenario and combo.pool != "solo" and ns.sleep_tasks:
            self.add(
                [
                    sleep_drain(
                        ctx,
                        framework,
                        combo,
                        target,
                        repeat,
                        ns.sleep_tasks,
                        ns.sleep_seconds,
                        # the asyncio pool runs coroutines natively; a blocking sleep would
                        # measure its executor's threads instead
                        "bench.async_sleep" if combo.pool == "asyncio" else "bench.sleep",
                    )
                ]
            )
        if "memory" in ns.scenario and combo.pool in MEMORY_POOLS and ns.tasks:
            self.add([memory_run(ctx, framework, combo, target, repeat, ns.tasks)])


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    if ns.report is not None:
        data = json.loads(ns.report.read_text())
        print(report.render([Record.from_json(r) for r in data["records"]], data["meta"]), end="")
        return 0
    settle(ns)
    side = SideChannel(ns.side_url)
    problem = side.check()
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    run_dir = Path(tempfile.mkdtemp(prefix="millpond-bench-"))
    targets = []
    for name in ns.broker:
        t = brokers.target(name, run_dir, ns.redis_db)
        trouble = t.check()
        if trouble:
            print(f"bench: skipping {name}: {trouble}", file=sys.stderr)
            continue
        targets.append(t)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = ns.out or RESULTS / f"{stamp}.json"
    session = Session(ns, out)
    session.meta["plugins"] = plugin_listing()
    wrap = profiling.wrap if ns.profile else None
    ctx = Context(
        side=side, run_dir=run_dir, timeout=ns.timeout, grace=ns.grace, wrap_millpond=wrap
    )
    began = time.monotonic()
    try:
        session.run(ctx, targets)
    except KeyboardInterrupt:
        print("bench: interrupted; the results so far are saved", file=sys.stderr)
    finally:
        session.meta["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        session.meta["wall_s"] = round(time.monotonic() - began, 1)
        session.save()
        side.close()
    if not session.records:
        print(
            "bench: nothing was run: no selected broker is reachable, or the selection has no "
            "combination (Celery does not run on sqlite)",
            file=sys.stderr,
        )
    text = report.render(session.records, session.meta)
    print(text, end="")
    if ns.profile:
        for prof in sorted(run_dir.glob("*.prof")):
            print()
            print(
                profiling.summary(
                    prof, ns.sleep_tasks if prof.name.startswith("sleep") else ns.tasks
                )
            )
    scaled = 0
    if ns.targets:
        scaled, text = targets_tail(ns, out, text, session.meta)
        if ns.markdown is None:
            ns.markdown = out.with_suffix(".md")
    if ns.markdown is not None:
        ns.markdown.write_text(text)
        print(f"\nmarkdown: {ns.markdown}", file=sys.stderr)
    print(f"\nresults: {out}", file=sys.stderr)
    if ns.keep:
        print(f"worker logs: {run_dir}", file=sys.stderr)
    else:
        brokers.remove_dir(run_dir)
    ok = session.records and all(r.ok for r in session.records)
    return 0 if ok and scaled == 0 else 1


def targets_tail(
    ns: argparse.Namespace, out: Path, text: str, meta: dict[str, Any]
) -> tuple[int, str]:
    """The scaling curve after the interleaved run, and the markdown section for the docs.

    The curve runs after the comparison, not interleaved with it: it is millpond against itself
    (ratios between its points), so it need not share the comparison's noise.
    """
    argv = ["--broker", "redis", "--out", str(out.with_name(out.stem + "-scaling.json"))]
    argv += ["--png", str(ns.scaling_png), "--timeout", str(max(ns.timeout, 30.0))]
    if ns.quick:
        argv.append("--quick")
    code = scaling.main(argv)
    table_json = json.loads(out.with_name(out.stem + "-scaling.json").read_text())
    points = [scaling.Point(**p) for p in table_json["points"]]
    command = "python3 dev.py bench --targets" + (" --quick" if ns.quick else "")
    section = [
        f"### Issue 24 run, {meta.get('started', '?')[:10]}",
        "",
        f"`{command}` on {meta.get('host', '?')} ({meta.get('cpus', '?')} CPUs), "
        f"{meta.get('wall_s', '?')} s for the comparison; {meta.get('tasks')} no-ops per drain, "
        f"{meta.get('sleep_tasks')} 10 ms sleeps, {meta.get('latency_samples')} latency probes.",
        "",
        text.rstrip(),
        "",
        "### Scaling",
        "",
        "![throughput and latency against concurrency and workers](scaling.png)",
        "",
        scaling.markdown(points).rstrip(),
        "",
    ]
    return code, "\n".join(section)


if __name__ == "__main__":
    sys.exit(main())
