"""What tracing (and metrics) cost: no-op task throughput with them off and on, same run.

    .venv/bin/python benchmarks/tracing_overhead.py                     # sqlite, solo + threads:4
    .venv/bin/python benchmarks/tracing_overhead.py --broker redis://127.0.0.1:6379/15 -n 5000
    .venv/bin/python benchmarks/tracing_overhead.py --metrics --repeat 5

For each repeat, for each pool, every mode runs back to back in a fresh interpreter (the order
reverses between repeats, so drift on a shared machine hits all modes alike):

* `off`: no OTEL_* variables at all (`telemetry.TRACING` False): the production default.
* `on`: OTEL_EXPORTER_OTLP_ENDPOINT set; every message carries a sampled `traceparent`, as if its
  producer were traced, so the worker makes a `process` and a `run` span per task and exports
  them all over OTLP/HTTP, through millpond's span recorder (the default). The batch queue is
  sized so no span is dropped (dropping would make tracing look cheaper than it is) and the
  collector's span count is checked.
* `on-sdk`: the same with `trace_span_recorder = false`: the worker's spans are OpenTelemetry SDK
  spans, exported by the SDK's batch processor and OTLP exporter.
* `on-10%`: the same, but one message in ten is sampled (a producer with
  OTEL_TRACES_SAMPLER=parentbased_traceidratio and OTEL_TRACES_SAMPLER_ARG=0.1): the worker follows
  the producer's decision, so nine tasks in ten make only non-recording spans.
* `metrics` (with --metrics): tracing off, OTLP metrics on, exported every second.

Each child prefills the queue with N no-op tasks, runs a `Worker` in-process, and times from the
worker's ready signal until it has finished all N. The collector is a stand-in in this process
that parses each OTLP request (protobuf, in C) and counts what it holds: a real collector runs
elsewhere, so its decoding cost is not the worker's. Medians are printed with the overhead of each
mode against `off`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODES = ("off", "on", "on-10%", "on-sdk")


class Collector:
    """An OTLP/HTTP endpoint that only counts spans and metric exports."""

    def __init__(self) -> None:
        self.spans = 0
        self.metric_exports = 0
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.startswith("/v1/traces"):
                    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
                        ExportTraceServiceRequest,
                    )

                    request = ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    count = sum(
                        len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans
                    )
                    with collector._lock:
                        collector.spans += count
                elif self.path.startswith("/v1/metrics"):
                    with collector._lock:
                        collector.metric_exports += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def child(args: argparse.Namespace) -> None:
    """One measurement, in its own interpreter (an OpenTelemetry provider is per process)."""
    from millpond import Millpond, observability
    from millpond.protocol import encode_task
    from millpond.settings import load_settings
    from millpond.worker import Worker

    if args.mode.startswith("on"):
        recorder = args.mode != "on-sdk"
        assert observability.configure_tracing("bench-worker", span_recorder=recorder), (
            "tracing did not turn on"
        )
    queue = args.queue
    app = Millpond(
        "bench", broker_url=args.broker, default_queue=queue, queues=[queue], ignore_result=True
    )

    @app.task(name="bench.noop")
    def noop() -> None:
        return None

    broker = app.broker
    broker.declare([queue])
    broker.purge(queue)
    every = 10 if args.mode == "on-10%" else 1
    for i in range(args.n):
        message = encode_task("bench.noop", (), {}, sent_at=time.time())
        if args.mode.startswith("on"):
            flags = "01" if i % every == 0 else "00"  # the producer's sampling decision
            message.headers["traceparent"] = (
                f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-{flags}"
            )
        broker.publish(queue, message)
    settings = load_settings(
        {"pool": args.pool, "concurrency": args.concurrency, "log_level": "WARNING"},
        env={},
        code=app.code_config,
    )
    worker = Worker(app, settings=settings)
    if args.mode == "metrics":
        plan = observability.plan_metrics("bench-worker")
        assert plan is not None, "metrics did not turn on"
        observability._plan = plan  # what `millpond worker` does before the pool starts
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    if not worker.ready.wait(30):
        raise SystemExit("worker not ready in 30 s")
    started = time.perf_counter()
    cpu_started = time.process_time()  # every thread of this process: loop, pool, exporter
    deadline = time.monotonic() + args.timeout
    while worker.processed < args.n:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {worker.processed} of {args.n} done in {args.timeout} s")
        time.sleep(0.002)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    worker.stop()
    thread.join(30)
    observability.shutdown()  # exports every remaining span before the count is taken
    print(json.dumps({"rate": args.n / elapsed, "elapsed": elapsed, "cpu_us": cpu / args.n * 1e6}))


def run_child(
    args: argparse.Namespace, pool: str, concurrency: int, mode: str, collector: Collector
) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MILLPOND_"))}
    env["PYTHONPATH"] = str(ROOT)
    if mode.startswith("on"):
        env.update(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
                "OTEL_SERVICE_NAME": "bench-worker",
                "OTEL_BSP_MAX_QUEUE_SIZE": str(4 * args.n + 4096),
                "OTEL_METRICS_EXPORTER": "none",
            }
        )
    elif mode == "metrics":
        env.update(
            {
                "OTEL_METRICS_EXPORTER": "otlp",
                "OTEL_METRIC_EXPORT_INTERVAL": "1000",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"{collector.endpoint}/v1/metrics",
                "OTEL_TRACES_EXPORTER": "none",
            }
        )
    queue = f"bench-trace-{uuid.uuid4().hex[:8]}"
    cmd = [
        sys.executable, __file__, "--child", "--mode", mode, "--pool", pool,
        "--concurrency", str(concurrency), "--broker", args.broker, "-n", str(args.n),
        "--queue", queue, "--timeout", str(args.timeout),
    ]  # fmt: skip
    before = collector.spans
    done = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout + 60,
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{pool}/{mode} failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if mode.startswith("on"):
        sampled = len(range(0, args.n, 10)) if mode == "on-10%" else args.n
        got = collector.spans - before
        if got != 2 * sampled:  # a process and a run span per sampled task
            raise SystemExit(f"{pool}/{mode}: the collector got {got} spans, not {2 * sampled}")
    return float(result["rate"]), float(result["cpu_us"])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="off", help=argparse.SUPPRESS)
    parser.add_argument("--queue", default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--pool", default="solo", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument(
        "--broker", default=None, help="broker URL (default: a fresh sqlite file in a temp dir)"
    )
    parser.add_argument("-n", type=int, default=3000, help="tasks per run (default 3000)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats; medians are reported")
    parser.add_argument(
        "--pools", default="solo:1,threads:4", help="pool:concurrency list (solo:1,threads:4)"
    )
    parser.add_argument("--metrics", action="store_true", help="also measure metrics on")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    tmp = tempfile.TemporaryDirectory(prefix="millpond-bench-")
    if args.broker is None:
        args.broker = f"sqlite://{Path(tmp.name) / 'broker.sqlite3'}"
    modes = list(MODES) + (["metrics"] if args.metrics else [])
    pools = [
        (p.split(":")[0], int(p.split(":")[1]) if ":" in p else 1) for p in args.pools.split(",")
    ]
    rates: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    collector = Collector()
    try:
        for repeat in range(args.repeat):
            order = modes if repeat % 2 == 0 else list(reversed(modes))
            for pool, concurrency in pools:
                for mode in order:
                    rate, cpu = run_child(args, pool, concurrency, mode, collector)
                    rates.setdefault((f"{pool}:{concurrency}", mode), []).append(rate)
                    cpus.setdefault((f"{pool}:{concurrency}", mode), []).append(cpu)
                    print(
                        f"repeat {repeat + 1} {pool}:{concurrency:<3} {mode:<8} "
                        f"{rate:8.0f} tasks/s {cpu:7.1f} µs CPU/task",
                        flush=True,
                    )
    finally:
        collector.close()
        tmp.cleanup()
    if args.metrics and not collector.metric_exports:
        raise SystemExit("metrics mode exported nothing: check the OTLP metrics set-up")
    print(
        f"\nbroker {args.broker.split('?')[0]}, {args.n} no-op tasks per run, "
        f"medians of {args.repeat}"
    )
    print(
        "throughput is wall clock (noisy on a shared machine); CPU is the worker process's own "
        "time per task, all threads (steadier)"
    )
    print(
        f"{'pool':<12} {'mode':<8} {'tasks/s':>9} {'overhead':>9} {'CPU µs/task':>12} "
        f"{'CPU extra':>10}"
    )
    for pool, concurrency in pools:
        key = f"{pool}:{concurrency}"
        base = statistics.median(rates[(key, "off")])
        base_cpu = statistics.median(cpus[(key, "off")])
        for mode in modes:
            median = statistics.median(rates[(key, mode)])
            cpu = statistics.median(cpus[(key, mode)])
            overhead = "" if mode == "off" else f"{(1 - median / base) * 100:8.1f}%"
            extra = "" if mode == "off" else f"{(cpu / base_cpu - 1) * 100:+9.1f}%"
            print(f"{key:<12} {mode:<8} {median:9.0f} {overhead:>9} {cpu:12.1f} {extra:>10}")


if __name__ == "__main__":
    main()
