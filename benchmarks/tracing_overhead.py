"""What tracing every task costs a worker: CPU per traced no-op task and throughput, interleaved.

    .venv/bin/python benchmarks/tracing_overhead.py                  # Redis, RabbitMQ; solo, threads 16
    .venv/bin/python benchmarks/tracing_overhead.py --baseline ../old  # + that checkout's untraced worker
    .venv/bin/python benchmarks/tracing_overhead.py --broker redis --pool solo --rounds 3 --tasks 5000
    .venv/bin/python benchmarks/tracing_overhead.py --micro [--against ../old]  # the hooks alone
    .venv/bin/python benchmarks/tracing_overhead.py --report <results.json>

Each drain is a real `millpond worker` subprocess (`-A benchmarks.tracing_tasks:app`) on a fresh
queue pre-loaded with [start mark, N x bench.noop, end mark]. Every message carries a sampled W3C
`traceparent`, as if its producer were traced, so a traced worker makes one `process` span per
task. The marks report the wall clock and the worker process's own CPU time (all threads, the
export thread included; see `benchmarks/tracing_tasks.py`), so start-up and shutdown are not
counted. Configurations (`--configs`):

* `untraced`: no OTEL_* variable at all (the tracing hook finds no provider and does nothing);
* `spans`: SDK spans made and handed to a batch processor whose exporter drops them without
  encoding them (installed by the app module, `BENCH_SPANS_ONLY`): making spans, without export;
* `otlp`: SDK spans exported by the standard OTLP/HTTP exporter (`OTEL_TRACES_EXPORTER=
  otlp_proto_http`, the opentelemetry-exporter-otlp-proto-http package);
* `fast`: SDK spans exported by millpond-otlp (`OTEL_TRACES_EXPORTER=millpond_otlp`);
* `base`: the untraced worker of another checkout (`--baseline DIR`, run with that checkout's own
  `.venv`), to check that untraced throughput did not drop.

Traced workers export to `benchmarks/otlp_sink.py`, an OTLP/HTTP receiver on 127.0.0.1 in its own
process that discards what it reads (its CPU is not the worker's). The batch processor's queue is
sized to hold a whole drain (`OTEL_BSP_MAX_QUEUE_SIZE`), so no span is dropped (dropping would make
tracing look cheaper than it is), and the sink's span count is checked: exactly one span per task,
sent by the exporter the configuration names (by its User-Agent).

The machine is shared and its speed drifts by tens of percent, so configurations are never
compared across runs: each round runs every configuration once per (broker, pool), in an order
rotated from round to round, and the report gives medians over rounds of the per-round ratios and
differences against the same round's untraced drain.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks import brokers  # noqa: E402
from benchmarks.model import MILLPOND, RunFailed  # noqa: E402
from benchmarks.side import SideChannel  # noqa: E402
from benchmarks.workers import WorkerProcess, environment  # noqa: E402

CONFIGS = ("untraced", "spans", "otlp", "fast", "base")
#: the exporter entry point (SDK group `opentelemetry_traces_exporter`) and the User-Agent prefix
#: the sink must see for each traced configuration
EXPORTERS = {
    "otlp": ("otlp_proto_http", "OTel-OTLP-Exporter-Python/"),
    "fast": ("millpond_otlp", "millpond-otlp/"),
}
TRACEPARENT = "00-{}-{}-01"


@dataclass(slots=True)
class Drain:
    """One drain: a configuration on a (broker, pool) in one round."""

    config: str
    broker: str
    pool: str
    concurrency: int
    round: int
    ok: bool = False
    tasks: int = 0
    rate: float | None = None  # tasks/s, start mark to end mark
    cpu_us: float | None = None  # worker CPU per task, µs
    gc_us: float | None = None  # of which the garbage collector, µs per task
    gc_runs: list[int] = field(default_factory=list)  # collections per generation in the drain
    spans: int | None = None
    agents: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    tail: str | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        return self.broker, self.pool, self.concurrency


# -- the sink ---------------------------------------------------------------------------------------
class SinkProcess:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.otlp_sink"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("the OTLP sink did not start")
        self.port = int(json.loads(line)["port"])
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def _call(self, method: str, path: str) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.endpoint}{path}", method=method, data=None)
        with urllib.request.urlopen(request, timeout=120) as reply:
            return dict(json.loads(reply.read() or b"{}"))

    def reset(self) -> None:
        self._call("POST", "/reset")

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/stats")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# -- one drain -------------------------------------------------------------------------------------
def _python(config: str, baseline: Path | None) -> str:
    if config != "base":
        return sys.executable
    assert baseline is not None
    return str(baseline / ".venv" / "bin" / "python")


def _environment(
    config: str, url: str, side: SideChannel, run_dir: Path, sink: SinkProcess, tasks: int
) -> dict[str, str]:
    env = environment(MILLPOND, url, side.url, run_dir)  # no OTEL_*, MILLPOND_* but the run's own
    if config == "spans":
        env["BENCH_SPANS_ONLY"] = "1"
        env["OTEL_BSP_MAX_QUEUE_SIZE"] = str(tasks + 4096)
    if config in EXPORTERS:
        env.update(
            {
                "OTEL_TRACES_EXPORTER": EXPORTERS[config][0],
                "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_SERVICE_NAME": "bench-worker",
                # tracing alone: the endpoint would also turn on millpond-metrics' OTLP export
                "OTEL_METRICS_EXPORTER": "none",
                "OTEL_LOGS_EXPORTER": "none",
                # a whole drain fits: no span is ever dropped
                "OTEL_BSP_MAX_QUEUE_SIZE": str(tasks + 4096),
            }
        )
    return env


def _prefill(url: str, queue: str, tasks: int, start_key: str, end_key: str) -> None:
    from millpond import Millpond
    from millpond.wire.protocol import SENT_AT, encode_task

    app = Millpond("bench-producer", broker_url=url, default_queue=queue, ignore_result=True)
    try:
        broker = app.broker
        broker.declare([queue])

        def message(name: str, args: tuple[Any, ...] = ()) -> Any:
            traceparent = TRACEPARENT.format(uuid.uuid4().hex, uuid.uuid4().hex[:16])
            return encode_task(
                name, args, {},
                headers={"ignore_result": True, SENT_AT: time.time(), "traceparent": traceparent},
            )  # fmt: skip

        broker.publish(queue, message("bench.cpu_mark", (start_key, False)))
        for _ in range(tasks):
            broker.publish(queue, message("bench.noop"))
        broker.publish(queue, message("bench.cpu_mark", (end_key, True)))
    finally:
        app.close()


def run_drain(
    drain: Drain,
    args: argparse.Namespace,
    side: SideChannel,
    sink: SinkProcess,
    run_dir: Path,
) -> Drain:
    target = brokers.target(drain.broker, run_dir, args.redis_db)
    start_key, end_key = side.key("start"), side.key("end")
    worker: WorkerProcess | None = None
    queue = ""
    try:
        for _ in range(3):
            queue = f"bench-trace-{uuid.uuid4().hex[:10]}"
            _prefill(target.url, queue, args.tasks, start_key, end_key)
            depth = brokers.depth(target, queue)
            if depth in (None, args.tasks + 2):
                break
            # A publisher that lost its connection re-sends what it had no confirm for: the queue
            # then holds a message twice, and the drain would run (and trace) one task too many.
            print(f"queue {queue} holds {depth} messages, not {args.tasks + 2}: loading a new one")
            brokers.cleanup(target, queue)
        else:
            raise RunFailed("could not load a queue with exactly one copy of each message")
        sink.reset()
        argv = [
            _python(drain.config, args.baseline), "-m", "millpond", "worker",
            "-A", "benchmarks.tracing_tasks:app", "-P", drain.pool, "-c", str(drain.concurrency),
            "-Q", queue, "-l", "WARNING",
        ]  # fmt: skip
        env = _environment(drain.config, target.url, side, run_dir, sink, args.tasks)
        log = run_dir / f"{drain.config}-{drain.broker}-{drain.pool}-{drain.round}.log"
        worker = WorkerProcess(argv, env, log)
        deadline = time.monotonic() + args.timeout
        start = side.wait_json(start_key, deadline, worker.problem, "the start mark")
        end = side.wait_json(end_key, deadline, worker.problem, "the end mark")
        if start["pid"] != end["pid"]:
            raise RunFailed("the marks ran in different processes: CPU times do not compare")
        outcome = worker.stop(args.grace)  # warm: the provider exports what is left
        if outcome["killed"]:
            raise RunFailed(f"the worker did not stop within {args.grace:g} s of SIGTERM")
        stats = sink.stats()
        drain.tasks = args.tasks
        drain.rate = args.tasks / max(end["wall"] - start["wall"], 1e-9)
        drain.cpu_us = (end["cpu"] - start["cpu"]) / args.tasks * 1e6
        if "gc_cpu" in end and "gc_cpu" in start:
            drain.gc_us = (sum(end["gc_cpu"]) - sum(start["gc_cpu"])) / args.tasks * 1e6
            drain.gc_runs = [b - a for a, b in zip(start["gc_runs"], end["gc_runs"], strict=True)]
        drain.spans = int(stats["spans"]) + int(end.get("discarded", 0))
        drain.agents = dict(stats["by_agent"])
        if stats["rejected"]:
            raise RunFailed(f"the sink could not decode requests: {stats['rejected'][:2]}")
        if stats["other"]:
            raise RunFailed(f"the worker exported more than spans: {stats['other']}")
        _check_spans(drain, args.tasks)
        drain.ok = True
    except Exception as exc:
        drain.error = str(exc) if isinstance(exc, RunFailed) else f"{type(exc).__name__}: {exc}"
        if worker is not None:
            worker.stop(args.grace)
            drain.tail = worker.tail()
    finally:
        if queue:
            brokers.cleanup(target, queue)
    return drain


def _check_spans(drain: Drain, tasks: int) -> None:
    """One span per task run (the two marks included), all from the configuration's exporter."""
    spans = drain.spans or 0
    redelivered = (
        " (more spans than messages: some were delivered twice, as after a broker connection "
        "reset; at-least-once, but this drain's figures are not clean)"
    )
    if drain.config == "spans":
        # the end mark counted what was exported before its own span ended
        if spans != tasks + 1:
            why = redelivered if spans > tasks + 1 else ""
            raise RunFailed(f"spans: {spans} spans dropped for {tasks + 1} tasks{why}")
        return
    if drain.config not in EXPORTERS:
        if spans:
            raise RunFailed(f"{drain.config}: the sink got {spans} spans from {drain.agents}")
        return
    expected = tasks + 2
    prefix = EXPORTERS[drain.config][1]
    wrong = {agent: n for agent, n in drain.agents.items() if not agent.startswith(prefix)}
    if wrong:
        raise RunFailed(f"{drain.config}: spans from another exporter than {prefix}*: {wrong}")
    if spans != expected:
        why = redelivered if spans > expected else ""
        raise RunFailed(f"{drain.config}: the sink got {spans} spans for {expected} tasks{why}")


# -- the report ------------------------------------------------------------------------------------
def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(drains: list[Drain]) -> list[dict[str, Any]]:
    """Per (broker, pool, config): medians, and per-round ratios against the same round's drains."""
    rows: list[dict[str, Any]] = []
    keys = sorted({d.key for d in drains}, key=lambda k: (k[0] != "redis", k[1] != "solo", k))
    for key in keys:
        mine = [d for d in drains if d.key == key]
        by_round: dict[int, dict[str, Drain]] = {}
        for d in mine:
            if d.ok:
                by_round.setdefault(d.round, {})[d.config] = d
        for config in [c for c in CONFIGS if any(d.config == c for d in mine)]:
            ok = [d for d in mine if d.config == config and d.ok]
            ratio, added, cpu_ratio, vs_base, vs_otlp, saved = [], [], [], [], [], []
            for drains_of_round in by_round.values():
                fast, otlp = drains_of_round.get("fast"), drains_of_round.get("otlp")
                if config == "fast" and fast and otlp and fast.rate and otlp.rate:
                    vs_otlp.append(fast.rate / otlp.rate)
                    if fast.cpu_us is not None and otlp.cpu_us is not None:
                        saved.append(otlp.cpu_us - fast.cpu_us)
                this, plain = drains_of_round.get(config), drains_of_round.get("untraced")
                if this is None or plain is None or not (this.rate and plain.rate):
                    continue
                if this.cpu_us is None or plain.cpu_us is None:
                    continue
                ratio.append(this.rate / plain.rate)
                added.append(this.cpu_us - plain.cpu_us)
                cpu_ratio.append(this.cpu_us / plain.cpu_us)
                base = drains_of_round.get("base")
                if config == "untraced" and base is not None and base.rate:
                    vs_base.append(plain.rate / base.rate)
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
                    "gc_us": _median([d.gc_us for d in ok if d.gc_us is not None]),
                    "ratio": _median(ratio),
                    "added_us": _median(added),
                    "cpu_ratio": _median(cpu_ratio),
                    "untraced_vs_base": _median(vs_base),
                    "fast_vs_otlp": _median(vs_otlp),
                    "saved_us": _median(saved),
                }
            )
    return rows


LABELS = {
    "untraced": "untraced",
    "spans": "SDK spans, not exported",
    "otlp": "SDK spans, standard OTLP exporter",
    "fast": "SDK spans, millpond-otlp exporter",
    "base": "untraced, baseline checkout",
}


def report(data: dict[str, Any]) -> str:
    drains = [Drain(**d) for d in data["drains"]]
    rows = summarize(drains)
    meta = data["meta"]
    out = [
        f"{meta['date']}, {meta['machine']}; Python {meta['python']}; {meta['versions']}",
        f"{meta['tasks']} no-op tasks per drain, {meta['rounds']} interleaved rounds; medians; "
        "'vs untraced' and '+CPU' are medians of per-round ratios and differences against the same "
        "round's untraced drain"
        + (f"; baseline: {meta['baseline']}" if meta.get("baseline") else ""),
        "",
        "| broker | pool | configuration | tasks/s | vs untraced | CPU µs/task | +CPU µs/task "
        "| CPU vs untraced | of which GC µs/task |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        pool = "solo" if row["pool"] == "solo" else f"{row['pool']} {row['concurrency']}"
        broker = {"amqp": "RabbitMQ", "redis": "Redis"}.get(row["broker"], row["broker"])
        cells = [
            broker,
            pool,
            LABELS[row["config"]] + (f" ({row['failed']} failed)" if row["failed"] else ""),
            f"{row['rate']:,.0f}" if row["rate"] else "-",
            f"{row['ratio']:.2f}" if row["ratio"] is not None else "-",
            f"{row['cpu_us']:.1f}" if row["cpu_us"] is not None else "-",
            f"{row['added_us']:+.1f}"
            if row["added_us"] is not None and row["config"] != "untraced"
            else "",
            f"{row['cpu_ratio']:.2f}x"
            if row.get("cpu_ratio") is not None and row["config"] != "untraced"
            else "",
            f"{row['gc_us']:.1f}" if row.get("gc_us") is not None else "-",
        ]
        out.append("| " + " | ".join(cells) + " |")
    fast = [r for r in rows if r["config"] == "fast" and r.get("fast_vs_otlp")]
    if fast:
        out.append("")
        out.append(
            "millpond-otlp against the standard exporter (median per-round throughput ratio; "
            "CPU per task it saves):"
        )
        for row in fast:
            pool = "solo" if row["pool"] == "solo" else f"{row['pool']} {row['concurrency']}"
            out.append(
                f"- {row['broker']} {pool}: {row['fast_vs_otlp']:.2f}x, "
                f"{row['saved_us']:.1f} µs less"
            )
    untraced = [r for r in rows if r["config"] == "untraced" and r["untraced_vs_base"]]
    if untraced:
        out.append("")
        out.append(
            "Untraced throughput, this checkout against the baseline (median per-round ratio):"
        )
        for row in untraced:
            pool = "solo" if row["pool"] == "solo" else f"{row['pool']} {row['concurrency']}"
            out.append(f"- {row['broker']} {pool}: {row['untraced_vs_base']:.2f}")
    failures = [d for d in drains if not d.ok]
    if failures:
        out.append("")
        out.append("Failed drains:")
        for d in failures:
            out.append(f"- {d.config} {d.broker} {d.pool} round {d.round}: {d.error}")
    return "\n".join(out)


def _versions(baseline: Path | None) -> str:
    from importlib import metadata

    names = ["millpond", "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http", "protobuf"]
    found = []
    for name in [*names, "millpond-otlp", "redis", "amqp"]:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
        check=False,
    ).stdout.strip()  # fmt: skip
    return ", ".join(found) + (f"; commit {head}" if head else "")


def _machine() -> str:
    cpus = os.cpu_count()
    try:
        import psutil

        memory = f", {psutil.virtual_memory().total / 2**30:.0f} GiB"
    except Exception:
        memory = ""
    return f"{platform.system()} {platform.release()}, {cpus} CPUs{memory}"


# -- the hooks alone, in-process ------------------------------------------------------------------
MICRO_CHILD = r"""
import contextvars, gc, json, sys, time, uuid
mode, n = sys.argv[1], int(sys.argv[2])
exported = []
if mode != "off":
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Keep(SpanExporter):
        def export(self, spans):
            exported.extend(spans)
            return SpanExportResult.SUCCESS

    provider = TracerProvider(resource=Resource.create({"service.name": "bench-worker"}))
    provider.add_span_processor(
        BatchSpanProcessor(Keep(), max_queue_size=n + 10, schedule_delay_millis=600000,
                           max_export_batch_size=n + 10)
    )
    trace.set_tracer_provider(provider)
from millpond.contracts.pool import Job, Outcome
from millpond_tracing.hooks import TracingHooks
from millpond.states import TaskState

hooks = TracingHooks()
hooks.system, hooks.pool = "redis", "solo"
ok = Outcome(state=TaskState.SUCCESS)

def jobs():
    out = []
    for _ in range(n):
        job = Job(task_id=str(uuid.uuid4()), task_name="bench.noop", args=(), kwargs={},
                  queue="bench", sent_at=time.time())
        job.headers = {"traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"}
        out.append(job)
    return out

def enter(job):
    hooks.enter_task(job)

best = {}
for _ in range(5):
    batch = jobs()
    gc.collect()
    t0 = time.process_time()
    for job in batch:
        hooks.started(job)
    t1 = time.process_time()
    for job in batch:
        contextvars.Context().run(enter, job)
    t2 = time.process_time()
    for job in batch:
        hooks.finished(job, ok)
    t3 = time.process_time()
    for name, value in (("started", t1 - t0), ("enter_task", t2 - t1), ("finished", t3 - t2),
                        ("hooks", t3 - t0)):
        best[name] = min(best.get(name, 1e9), value / n * 1e6)
    if mode != "off":
        provider.force_flush()
spans = exported[-n:]
if spans:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    encoders = {"encode standard": lambda b: encode_spans(b).SerializePartialToString()}
    try:
        from millpond_otlp.encode import encode_request
        encoders["encode millpond-otlp"] = encode_request
    except ImportError:
        pass
    for name, encode in encoders.items():
        for _ in range(3):
            t0 = time.process_time()
            for k in range(0, len(spans), 512):
                encode(spans[k:k + 512])
            best[name] = min(best.get(name, 1e9), (time.process_time() - t0) / len(spans) * 1e6)
print(json.dumps(best))
"""


def micro(n: int, against: Path | None, repeats: int) -> None:
    """Per-task CPU of the tracing hook's three calls, with no provider and with an SDK provider,
    and of encoding the resulting spans in batches of 512; best of 5 in each interpreter (one
    provider per process). With `against`, that checkout's core runs in alternate interpreters
    (its `core/src` first on the path), `repeats` times each, and the medians are compared."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MILLPOND_"))}
    trees: list[tuple[str, str | None]] = [("this checkout", None)]
    if against is not None:
        trees.append((against.name, str(against.resolve() / "core" / "src")))
    print(f"tracing hooks per task, µs of CPU (in-process, no broker; {n} jobs, best of 5 each):")
    for mode in ("off", "on"):
        results: dict[str, list[dict[str, float]]] = {label: [] for label, _ in trees}
        for _ in range(repeats if against is not None else 1):
            for label, src in trees:
                child_env = dict(env)
                if src is not None:
                    child_env["PYTHONPATH"] = src
                done = subprocess.run(
                    [sys.executable, "-c", MICRO_CHILD, mode, str(n)],
                    cwd=ROOT, env=child_env, capture_output=True, text=True, check=False,
                )  # fmt: skip
                if done.returncode != 0:
                    raise SystemExit(f"micro {mode} ({label}) failed:\n{done.stderr}")
                results[label].append(json.loads(done.stdout.strip().splitlines()[-1]))
        for label, runs in results.items():
            names = list(runs[0])
            medians = {k: statistics.median(r[k] for r in runs) for k in names}
            provider = "no provider" if mode == "off" else "SDK provider"
            print(
                f"  {provider:<13} {label:<16} "
                + "  ".join(f"{k} {v:.2f}" for k, v in medians.items())
            )


# -- main ------------------------------------------------------------------------------------------
def _pools(spec: str) -> list[tuple[str, int]]:
    pools = []
    for item in spec.split(","):
        name, _, count = item.partition(":")
        pools.append((name, int(count) if count else (1 if name == "solo" else 16)))
    return pools


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--broker", default="redis,amqp", help="redis,amqp (default both)")
    parser.add_argument("--pool", default="solo,threads:16", help="pool[:concurrency] list")
    parser.add_argument("--configs", default="untraced,otlp,fast", help=f"of {', '.join(CONFIGS)}")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a checkout with its own .venv: adds its untraced worker as the `base` configuration",
    )
    parser.add_argument("--tasks", type=int, default=10_000, help="no-op tasks per drain")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per drain")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds to stop warm")
    parser.add_argument("--redis-db", type=int, default=13)
    parser.add_argument("--side-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: results/)")
    parser.add_argument("--report", type=Path, default=None, help="print a saved run again")
    parser.add_argument("--micro", action="store_true", help="only the hooks, in-process")
    parser.add_argument("--micro-jobs", type=int, default=20_000)
    parser.add_argument(
        "--against", type=Path, default=None, help="with --micro: compare with this checkout's core"
    )
    parser.add_argument("--micro-repeats", type=int, default=5)
    args = parser.parse_args()
    if args.report is not None:
        print(report(json.loads(args.report.read_text())))
        return
    if args.micro:
        micro(args.micro_jobs, args.against, args.micro_repeats)
        return
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / ".venv" / "bin" / "python").exists():
            raise SystemExit(f"--baseline {args.baseline}: no .venv there (run dev.py env in it)")
        if "base" not in configs:
            configs.append("base")
    elif "base" in configs:
        raise SystemExit("the `base` configuration needs --baseline DIR")
    if "untraced" not in configs:
        configs.insert(0, "untraced")  # everything is compared with it
    broker_names = [b.strip() for b in args.broker.split(",") if b.strip()]
    pools = _pools(args.pool)
    side = SideChannel(args.side_url)
    problem = side.check()
    if problem:
        raise SystemExit(problem)
    run_dir = Path(tempfile.mkdtemp(prefix="millpond-trace-bench-"))
    for name in broker_names:
        problem = brokers.target(name, run_dir, args.redis_db).check()
        if problem:
            raise SystemExit(problem)
    out = (
        args.out
        or ROOT / "benchmarks" / "results" / f"tracing-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": _machine(),
            "python": platform.python_version(),
            "versions": _versions(args.baseline),
            "tasks": args.tasks,
            "rounds": args.rounds,
            "configs": configs,
            "baseline": _describe(args.baseline),
        },
        "drains": [],
    }
    sink = SinkProcess()
    try:
        for round_ in range(args.rounds):
            for broker in broker_names:
                for pool, concurrency in pools:
                    shift = round_ % len(configs)
                    for config in configs[shift:] + configs[:shift]:
                        drain = Drain(config, broker, pool, concurrency, round_)
                        run_drain(drain, args, side, sink, run_dir)
                        data["drains"].append(asdict(drain))
                        out.write_text(json.dumps(data, indent=1))
                        status = (
                            f"{drain.rate:8,.0f}/s {drain.cpu_us:6.1f} µs/task "
                            f"(gc {drain.gc_us or 0:4.1f}, runs {drain.gc_runs}) spans {drain.spans}"
                            if drain.ok and drain.rate and drain.cpu_us is not None
                            else f"FAILED: {drain.error}"
                        )
                        print(
                            f"round {round_ + 1}/{args.rounds} {broker:<5} "
                            f"{pool}:{concurrency:<3} {config:<9} {status}",
                            flush=True,
                        )
    finally:
        sink.close()
        side.close()
        brokers.remove_dir(run_dir)
    print()
    print(report(data))
    print(f"\nresults: {out}")


def _describe(baseline: Path | None) -> str | None:
    if baseline is None:
        return None
    head = subprocess.run(
        ["git", "log", "-1", "--format=%h %s"], cwd=baseline, capture_output=True, text=True,
        check=False,
    ).stdout.strip()  # fmt: skip
    return f"untraced worker of {head or baseline.name}"


if __name__ == "__main__":
    main()
