"""What tracing (and metrics) cost: no-op task throughput with them off and on, in alternating blocks.

    .venv/bin/python benchmarks/tracing_overhead.py                     # sqlite, solo + threads:4
    .venv/bin/python benchmarks/tracing_overhead.py --broker redis://127.0.0.1:6379/15
    .venv/bin/python benchmarks/tracing_overhead.py --metrics --blocks 30
    .venv/bin/python benchmarks/tracing_overhead.py --off-cost            # tracing off, per task

A shared machine's speed drifts by tens of percent from one second to the next, more than the
effect measured here, so "off" and "on" are not compared across separate runs. Each run is one
worker, in its own interpreter, with tracing set up for one mode; it drains the queue in blocks
of `--block` tasks, switching between off (`telemetry.TRACING` False: the code path of a worker
with no OTEL_* variables) and on from block to block. Each on block is compared with the mean of
the off blocks either side of it, and the median of those ratios is the overhead, printed with
its interquartile range. CPU per task (all of the worker's threads) is compared the same way.

Modes (each its own run):

* `on`: OTEL_EXPORTER_OTLP_ENDPOINT set; every message carries a sampled `traceparent`, as if its
  producer were traced, so the worker makes a `process` and a `run` span per task and exports
  them all over OTLP/HTTP, through millpond's span recorder (the default). The batch queue is
  sized so no span is dropped (dropping would make tracing look cheaper than it is) and the
  collector's span count is checked against the tasks run in on blocks.
* `on-sdk`: the same with `trace_span_recorder = false`: the worker's spans are OpenTelemetry SDK
  spans, exported by the SDK's batch processor and OTLP exporter.
* `on-10%`: one message in ten sampled (a producer with parentbased_traceidratio at 0.1): the
  worker follows the producer's decision, so nine tasks in ten make only non-recording spans.
* `metrics` (with --metrics): OTLP metrics exported every second, switched by `metrics.ENABLED`.

The collector is a stand-in in the parent process that keeps each OTLP request and decodes it
(protobuf, in C) after the run: a real collector runs elsewhere, so neither its decoding nor its
CPU should compete with the worker being measured.
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
        self.metric_exports = 0
        self._bodies: list[bytes] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.startswith("/v1/traces"):
                    with collector._lock:
                        collector._bodies.append(body)
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

    def take_spans(self) -> int:
        """How many spans arrived since the last call (decoded now, after the run)."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        with self._lock:
            bodies, self._bodies = self._bodies, []
        count = 0
        for body in bodies:
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            count += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        return count

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def child(args: argparse.Namespace) -> None:
    """One mode, in its own interpreter (an OpenTelemetry provider is per process)."""
    from millpond import Millpond, metrics, observability, telemetry
    from millpond.protocol import encode_task
    from millpond.settings import load_settings
    from millpond.worker import Worker

    tracing = args.mode.startswith("on")
    if tracing:
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
    needed = (2 * args.blocks + 1) * args.block
    for i in range(needed + needed // 4 + 2000):  # some run before the first block starts
        message = encode_task("bench.noop", (), {}, sent_at=time.time())
        if tracing:
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

    def switch(on: bool) -> None:
        if args.mode == "metrics":
            metrics.ENABLED = on
        else:
            telemetry.TRACING = on

    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    if not worker.ready.wait(30):
        raise SystemExit("worker not ready in 30 s")
    switch(False)
    deadline = time.monotonic() + args.timeout
    blocks: list[dict[str, Any]] = []
    done = worker.processed
    for index in range(2 * args.blocks + 1):  # off, on, off, ..., off
        on = index % 2 == 1
        switch(on)
        started, cpu_started, first = time.perf_counter(), time.process_time(), done
        while worker.processed < first + args.block:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {worker.processed} done in {args.timeout} s")
            if time.perf_counter() - started > 60:
                raise SystemExit(f"block {index}: {worker.processed - first} tasks in 60 s")
            time.sleep(0.0005)
        done = worker.processed
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        blocks.append({"on": on, "tasks": done - first, "elapsed": elapsed, "cpu": cpu})
    switch(False)
    worker.stop()
    thread.join(30)
    observability.shutdown()  # exports every remaining span before the count is taken
    traced = sum(b["tasks"] for b in blocks if b["on"])
    print(json.dumps({"blocks": blocks, "traced": traced}))


def off_cost(rounds: int = 200_000) -> None:
    """What tracing costs a task when it is off: the two helpers every task enters anyway."""
    from millpond import telemetry
    from millpond.pool import Job

    assert not telemetry.TRACING, "tracing is on in this process"
    job = Job(task_id="t", task_name="bench.noop", args=(), kwargs={}, queue="q")
    job.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers: dict[str, Any] = {}
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(rounds):
            with telemetry.publish_span("q", "bench.noop", "t", headers):
                pass
            with telemetry.enter_run_span(job):
                pass
        best = min(best, (time.perf_counter() - started) / rounds)
    print(f"tracing off: {best * 1e6:.2f} µs per task (publish_span + enter_run_span, best of 5)")


def run_child(
    args: argparse.Namespace, pool: str, concurrency: int, mode: str, collector: Collector
) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MILLPOND_"))}
    env["PYTHONPATH"] = str(ROOT)
    if args.pure_python:
        env["MILLPOND_PURE_PYTHON"] = "1"
    if mode.startswith("on"):
        env.update(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
                "OTEL_SERVICE_NAME": "bench-worker",
                "OTEL_BSP_MAX_QUEUE_SIZE": str(8 * args.blocks * args.block + 4096),
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
        "--concurrency", str(concurrency), "--broker", args.broker, "--queue", queue,
        "--blocks", str(args.blocks), "--block", str(args.block), "--timeout", str(args.timeout),
    ]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout + 120,
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{pool}/{mode} failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    got = collector.take_spans()
    if mode.startswith("on"):
        # A process and a run span per sampled task run in an on block (give or take the tasks
        # in the pool at a switch: up to the prefetch window either way).
        traced = result["traced"] / (10 if mode == "on-10%" else 1)
        slack = 2 * 64 * concurrency + 2 * args.blocks
        if abs(got - 2 * traced) > 2 * slack:
            raise SystemExit(f"{pool}/{mode}: the collector got {got} spans for {traced} tasks")
    return list(result["blocks"])


def paired(blocks: list[dict[str, Any]], key: str) -> list[float]:
    """Per on block: its cost relative to the mean of the off blocks either side of it.

    `key` "rate": throughput lost (1 - on/off); "cpu": CPU per task added (on/off - 1).
    """
    ratios = []
    for index in range(1, len(blocks) - 1, 2):
        before, on, after = blocks[index - 1], blocks[index], blocks[index + 1]
        if key == "rate":
            off_rate = (before["tasks"] / before["elapsed"] + after["tasks"] / after["elapsed"]) / 2
            ratios.append(1 - (on["tasks"] / on["elapsed"]) / off_rate)
        else:
            off_cpu = (before["cpu"] / before["tasks"] + after["cpu"] / after["tasks"]) / 2
            ratios.append((on["cpu"] / on["tasks"]) / off_cpu - 1)
    return ratios


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return q1, median, q3


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="on", help=argparse.SUPPRESS)
    parser.add_argument("--queue", default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--pool", default="solo", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument(
        "--broker", default=None, help="broker URL (default: a fresh sqlite file in a temp dir)"
    )
    parser.add_argument("--blocks", type=int, default=20, help="on blocks per mode (default 20)")
    parser.add_argument("--block", type=int, default=1000, help="tasks per block (default 1000)")
    parser.add_argument(
        "--pools", default="solo:1,threads:4", help="pool:concurrency list (solo:1,threads:4)"
    )
    parser.add_argument(
        "--modes", default="on,on-10%,on-sdk", help="modes to measure (on,on-10%%,on-sdk)"
    )
    parser.add_argument("--metrics", action="store_true", help="also measure metrics on")
    parser.add_argument(
        "--off-cost", action="store_true", help="only what tracing costs a task when it is off"
    )
    parser.add_argument(
        "--pure-python", action="store_true", help="the workers without the C part (_spancore)"
    )
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.off_cost:
        off_cost()
        return
    tmp = tempfile.TemporaryDirectory(prefix="millpond-bench-")
    if args.broker is None:
        args.broker = f"sqlite://{Path(tmp.name) / 'broker.sqlite3'}"
    modes = [m for m in args.modes.split(",") if m] + (["metrics"] if args.metrics else [])
    pools = [
        (p.split(":")[0], int(p.split(":")[1]) if ":" in p else 1) for p in args.pools.split(",")
    ]
    collector = Collector()
    rows = []
    try:
        for pool, concurrency in pools:
            for mode in modes:
                blocks = run_child(args, pool, concurrency, mode, collector)
                off = [b for b in blocks if not b["on"]]
                on = [b for b in blocks if b["on"]]
                rate_off = sum(b["tasks"] for b in off) / sum(b["elapsed"] for b in off)
                rate_on = sum(b["tasks"] for b in on) / sum(b["elapsed"] for b in on)
                cpu_off = sum(b["cpu"] for b in off) / sum(b["tasks"] for b in off) * 1e6
                cpu_on = sum(b["cpu"] for b in on) / sum(b["tasks"] for b in on) * 1e6
                lost = _quartiles(paired(blocks, "rate"))
                added = _quartiles(paired(blocks, "cpu"))
                rows.append(
                    (f"{pool}:{concurrency}", mode, rate_off, rate_on, lost, cpu_off, cpu_on, added)
                )
                print(
                    f"{pool}:{concurrency:<3} {mode:<8} off {rate_off:7.0f}/s on {rate_on:7.0f}/s "
                    f"lost {lost[1] * 100:5.1f}%  CPU {cpu_off:6.1f} -> {cpu_on:6.1f} µs",
                    flush=True,
                )
    finally:
        collector.close()
        tmp.cleanup()
    if args.metrics and not collector.metric_exports:
        raise SystemExit("metrics mode exported nothing: check the OTLP metrics set-up")
    print(
        f"\nbroker {args.broker.split('?')[0]}, no-op tasks, {args.blocks} on blocks of "
        f"{args.block} tasks between off blocks, per mode"
        + (", pure Python (MILLPOND_PURE_PYTHON=1)" if args.pure_python else "")
    )
    print(
        "lost: throughput lost in on blocks against the off blocks either side, median "
        "[interquartile range]; CPU: the worker's CPU per task (all threads), likewise"
    )
    print(
        f"{'pool':<11} {'mode':<8} {'off/s':>7} {'on/s':>7} {'lost':>6} {'[IQR]':>15} "
        f"{'CPU off':>8} {'CPU on':>7} {'added':>6}"
    )
    for key, mode, rate_off, rate_on, lost, cpu_off, cpu_on, added in rows:
        spread = f"[{lost[0] * 100:.1f}, {lost[2] * 100:.1f}]"
        print(
            f"{key:<11} {mode:<8} {rate_off:7.0f} {rate_on:7.0f} {lost[1] * 100:5.1f}% "
            f"{spread:>15} {cpu_off:6.1f}µs {cpu_on:5.1f}µs {added[1] * 100:+5.1f}%"
        )


if __name__ == "__main__":
    main()
