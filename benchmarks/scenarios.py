"""The measured scenarios, each run the same way for both frameworks.

* drain: with no worker running, enqueue [mark start, N x bench.noop, mark end] with the framework's
  own producer, start the worker, and time start mark to end mark. The start mark is also the
  first task the worker runs, so `startup_s` (Popen to the start of that task) comes for free.
* latency: on the same worker, now idle, send `bench.latency(key, time.time())` one at a time and
  wait for it to report when its body started; p50 and p99 of (start - sent).
* sleep: a fresh worker drains [mark start, N x bench.sleep(10 ms)]; the last sleep records the
  end (see `benchmarks.tasks.sleep` for why that is the end of the run).
* memory: a fresh worker on an empty queue runs one mark (it is up), settles, and the RSS of its
  whole process tree is read; then N no-ops and an end mark, settle, read again.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import brokers
from benchmarks.model import CELERY, DRAMATIQ, MILLPOND, Combo, Record, RunFailed
from benchmarks.producers import Producer, producer
from benchmarks.side import SideChannel
from benchmarks.timeouts import bounded
from benchmarks.workers import (
    WorkerProcess,
    celery_command,
    dramatiq_command,
    environment,
    millpond_command,
)

#: how long a worker is left alone before its memory is read: long enough for every child of a
#: two-process worker to have finished importing after the first task ran in one of them
MEMORY_SETTLE_S = 1.0


@dataclass(frozen=True, slots=True)
class Context:
    """What every run of one harness invocation shares."""

    side: SideChannel
    run_dir: Path
    timeout: float  # seconds one run may take, enqueueing excluded
    grace: float  # seconds a worker gets to shut down warm before SIGKILL
    #: wraps a millpond worker's argv (profiling); None runs it as is
    wrap_millpond: Callable[[list[str], Path], list[str]] | None = None


@dataclass(slots=True)
class Run:
    """One worker's life within a scenario: its queue, producer, process and findings."""

    ctx: Context
    framework: str
    combo: Combo
    target: brokers.Target
    queue: str
    producer: Producer
    scenario: str = "drain"
    worker: WorkerProcess | None = None
    deadline: float = 0.0
    #: filled when the run failed: messages left in the queue after the worker stopped
    left_in_queue: int | None = None

    def start_worker(self) -> WorkerProcess:
        tag = f"{self.scenario}-{self.framework}-{self.combo.broker}-{self.combo.pool}-{self.queue}"
        log = self.ctx.run_dir / f"{tag}.log"
        if self.framework == MILLPOND:
            argv = millpond_command(self.combo, self.queue)
            if self.ctx.wrap_millpond is not None:
                argv = self.ctx.wrap_millpond(argv, self.ctx.run_dir / f"{tag}.prof")
        elif self.framework == CELERY:
            argv = celery_command(self.combo, self.queue)
        else:
            argv = dramatiq_command(self.combo, self.queue)
        if self.framework == DRAMATIQ:
            env = environment(self.framework, self.target.url, self.ctx.side.url, self.ctx.run_dir)
            env["BENCH_DRAMATIQ_QUEUE"] = self.queue
        elif self.framework == MILLPOND:
            env = environment(self.framework, self.target.url, self.ctx.side.url, self.ctx.run_dir)
        else:
            url, options = self.target.for_celery()
            env = environment(
                self.framework, url, self.ctx.side.url, self.ctx.run_dir, json.dumps(options)
            )
        self.worker = WorkerProcess(argv, env, log)
        self.deadline = time.monotonic() + self.ctx.timeout
        return self.worker

    def wait(self, key: str, what: str) -> float:
        assert self.worker is not None
        return self.ctx.side.wait(key, self.deadline, self.worker.problem, what)


@contextmanager
def _run(
    ctx: Context, framework: str, combo: Combo, target: brokers.Target, scenario: str
) -> Iterator[Run]:
    """A fresh queue and producer; afterwards the worker stopped and everything cleaned up."""
    queue = f"bench-{uuid.uuid4().hex[:10]}"
    try:
        if framework in (MILLPOND, DRAMATIQ):
            prod = producer(framework, target.url, queue=queue)
        else:
            prod = producer(framework, *target.for_celery(), queue=queue)
    except Exception as exc:
        raise RunFailed(f"cannot create the {framework} producer: {type(exc).__name__}: {exc}")
    run = Run(ctx, framework, combo, target, queue, prod, scenario)
    failed = True
    try:
        yield run
        failed = False
    finally:
        try:
            prod.close()
        except Exception:
            pass
        if run.worker is not None:
            run.worker.stop(ctx.grace)
        if failed:  # after the stop, so unacknowledged messages are back in the queue
            run.left_in_queue = brokers.depth(target, queue, framework)
        brokers.cleanup(target, queue, framework)


def _failed(base: dict[str, Any], run: Run | None, exc: BaseException) -> Record:
    detail = dict(getattr(exc, "detail", {}) or {})
    tail = None
    if run is not None:
        if run.left_in_queue is not None:
            detail["left_in_queue"] = run.left_in_queue
        if run.worker is not None:
            tail = run.worker.tail()
    error = str(exc) if isinstance(exc, RunFailed) else f"{type(exc).__name__}: {exc}"
    return Record(**base, ok=False, error=error, metrics=detail, output_tail=tail)


def _enqueue(run: Run, batch: list[tuple[str, tuple[Any, ...]]]) -> float:
    """Send the batch with the framework's producer, bounded by the run's timeout; the rate."""
    sent = [0]

    def send() -> float:
        began = time.perf_counter()
        for name, args in batch:
            run.producer.send(name, args)
            sent[0] += 1
        return len(batch) / max(time.perf_counter() - began, 1e-9)

    try:
        return bounded(send, run.ctx.timeout, f"enqueueing {len(batch)} messages")
    except RunFailed as exc:
        raise RunFailed(f"{exc}; {sent[0]} were sent") from None
    except Exception as exc:
        raise RunFailed(
            f"the {run.framework} producer failed after {sent[0]} of {len(batch)} messages: "
            f"{type(exc).__name__}: {exc}"
        ) from None


def _stop_metrics(run: Run, metrics: dict[str, Any]) -> None:
    """Stop the worker now (so its shutdown is part of the record) and note how it went."""
    if run.worker is None:
        return
    outcome = run.worker.stop(run.ctx.grace)
    metrics["peak_rss_mib"] = round(run.worker.peak_rss_mib or 0.0, 1)
    metrics["peak_pss_mib"] = round(run.worker.peak_pss_mib or 0.0, 1)
    metrics["exit_code"] = outcome["exit"]
    metrics["stop_s"] = outcome["stop_s"]
    metrics["cpu_s"] = outcome.get("cpu_s")
    if outcome["killed"]:
        metrics["note"] = f"did not stop within {run.ctx.grace:g} s of SIGTERM: killed"


def drain_and_latency(
    ctx: Context,
    framework: str,
    combo: Combo,
    target: brokers.Target,
    repeat: int,
    n: int,
    samples: int,
) -> list[Record]:
    """The no-op drain of `n` tasks, then `samples` latency probes on the now idle worker.

    A drain that finished is kept even when the latency phase after it fails.
    """
    base: dict[str, Any] = {
        "broker": combo.broker,
        "pool": combo.pool,
        "concurrency": combo.concurrency,
        "framework": framework,
        "repeat": repeat,
    }
    drain: Record | None = None
    latency: Record | None = None
    run: Run | None = None
    phase = "drain"
    try:
        with _run(ctx, framework, combo, target, "drain") as run:
            start_key, end_key = ctx.side.key("start"), ctx.side.key("end")
            batch: list[tuple[str, tuple[Any, ...]]] = [("bench.mark", (start_key,))]
            batch += [("bench.noop", ())] * n
            batch.append(("bench.mark", (end_key,)))
            enqueue_rate = _enqueue(run, batch)
            worker = run.start_worker()
            t_start = run.wait(start_key, "the start mark (the first task)")
            cpu_start = worker.cpu_seconds()
            t_end = run.wait(end_key, f"the end mark after {n} no-op tasks")
            cpu_ms = (worker.cpu_seconds() - cpu_start) * 1000.0
            metrics: dict[str, Any] = {
                "n": n,
                "cpu_ms_per_task": round(cpu_ms / max(n, 1), 4),
                "startup_s": round(t_start - worker.started_at, 4),
                "elapsed_s": round(t_end - t_start, 4),
                "enqueue_rate": round(enqueue_rate, 1),
            }
            if n:
                rate = n / max(t_end - t_start, 1e-9)
                drain = Record(**base, scenario="drain", ok=True, value=rate, metrics=metrics)
            if samples:
                phase = "latency"
                remaining = max(run.deadline - time.monotonic(), 0.0)
                lat = bounded(lambda: _latency(run, samples), remaining + 1, "the latency probes")
                p50 = lat.pop("p50_ms")
                latency = Record(
                    **base, scenario="latency", ok=True, value=p50, unit="ms", metrics=lat
                )
            phase = "shutdown"
            _stop_metrics(run, metrics)
            if latency is not None:
                latency.metrics["peak_rss_mib"] = metrics.get("peak_rss_mib")
                latency.metrics["peak_pss_mib"] = metrics.get("peak_pss_mib")
    except Exception as exc:
        if drain is not None and run is not None and run.worker is not None:
            drain.metrics["peak_rss_mib"] = round(run.worker.peak_rss_mib or 0.0, 1)
            drain.metrics["peak_pss_mib"] = round(run.worker.peak_pss_mib or 0.0, 1)
        wanted = [s for s, want in (("drain", n), ("latency", samples)) if want]
        measured = {"drain": drain, "latency": latency}
        failed = []
        for scenario in wanted:
            if measured[scenario] is not None:
                continue
            rec = _failed({**base, "scenario": scenario}, run, exc)
            if scenario == "latency" and phase == "drain":
                rec.error = f"not measured: the drain before it failed ({rec.error})"
            failed.append(rec)
        if phase == "shutdown":  # both measured; the worker would not stop: say so on both
            for done in (drain, latency):
                if done is not None:
                    done.metrics["note"] = f"shutdown failed: {exc}"
        return [r for r in (drain, latency) if r is not None] + failed
    return [r for r in (drain, latency) if r is not None]


def _latency(run: Run, samples: int) -> dict[str, Any]:
    key = run.ctx.side.key("latency")
    run.producer.send("bench.latency", (key, time.time()))  # warm-up: connections, imports
    run.wait(key, "the warm-up latency probe")
    values: list[float] = []
    for i in range(samples):
        run.producer.send("bench.latency", (key, time.time()))
        values.append(run.wait(key, f"latency probe {i + 1} of {samples}") * 1000.0)
    return latency_figures(values)


def latency_figures(values: list[float]) -> dict[str, Any]:
    """p50, p99, mean and max of latency samples in ms (shared with the raw floor)."""
    ordered = sorted(values)
    return {
        "samples": len(values),
        "p50_ms": statistics.median(ordered),
        "p99_ms": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "mean_ms": statistics.fmean(ordered),
        "max_ms": ordered[-1],
    }


def sleep_drain(
    ctx: Context,
    framework: str,
    combo: Combo,
    target: brokers.Target,
    repeat: int,
    n: int,
    seconds: float,
    task: str = "bench.sleep",
) -> Record:
    """Drain `n` tasks that each sleep `seconds`: what a pool's concurrency is really worth.

    `task` is the sleeping task: `bench.async_sleep` for the asyncio pool's native coroutines.
    """
    base: dict[str, Any] = {
        "scenario": "sleep",
        "broker": combo.broker,
        "pool": combo.pool,
        "concurrency": combo.concurrency,
        "framework": framework,
        "repeat": repeat,
    }
    run: Run | None = None
    try:
        with _run(ctx, framework, combo, target, "sleep") as run:
            start_key, end_key = ctx.side.key("start"), ctx.side.key("end")
            batch: list[tuple[str, tuple[Any, ...]]] = [("bench.mark", (start_key,))]
            batch += [(task, (seconds,))] * (n - 1)
            batch.append((task, (seconds, end_key)))  # the last one marks the end
            enqueue_rate = _enqueue(run, batch)
            worker = run.start_worker()
            t_start = run.wait(start_key, "the start mark (the first task)")
            cpu_start = worker.cpu_seconds()
            t_end = run.wait(end_key, f"{n} sleep tasks to finish")
            cpu_ms = (worker.cpu_seconds() - cpu_start) * 1000.0
            metrics: dict[str, Any] = {
                "n": n,
                "cpu_ms_per_task": round(cpu_ms / max(n, 1), 4),
                "sleep_s": seconds,
                "startup_s": round(t_start - worker.started_at, 4),
                "elapsed_s": round(t_end - t_start, 4),
                "enqueue_rate": round(enqueue_rate, 1),
            }
            _stop_metrics(run, metrics)
            return Record(**base, ok=True, value=n / max(t_end - t_start, 1e-9), metrics=metrics)
    except Exception as exc:
        return _failed(base, run, exc)


def memory_run(
    ctx: Context, framework: str, combo: Combo, target: brokers.Target, repeat: int, n: int
) -> Record:
    """RSS (and PSS) of the worker's whole process tree once it is up, and after `n` no-ops.

    The worker starts on an empty queue; one mark tells it is consuming. Both readings come
    MEMORY_SETTLE_S after the task that precedes them, on an idle worker: what a deployment
    pays per worker at rest, before and after it has done some work.
    """
    base: dict[str, Any] = {
        "scenario": "memory",
        "broker": combo.broker,
        "pool": combo.pool,
        "concurrency": combo.concurrency,
        "framework": framework,
        "repeat": repeat,
        "unit": "MiB",
    }
    run: Run | None = None
    try:
        with _run(ctx, framework, combo, target, "memory") as run:
            up_key, end_key = ctx.side.key("up"), ctx.side.key("end")
            worker = run.start_worker()
            _enqueue(run, [("bench.mark", (up_key,))])
            t_up = run.wait(up_key, "the first task")
            time.sleep(MEMORY_SETTLE_S)
            rss_up, pss_up, procs_up = worker.rss_now()
            batch: list[tuple[str, tuple[Any, ...]]] = [("bench.noop", ())] * n
            batch.append(("bench.mark", (end_key,)))
            _enqueue(run, batch)
            run.wait(end_key, f"the end mark after {n} no-op tasks")
            time.sleep(MEMORY_SETTLE_S)
            rss_after, pss_after, procs_after = worker.rss_now()
            metrics: dict[str, Any] = {
                "n": n,
                "startup_s": round(t_up - worker.started_at, 4),
                "rss_up_mib": round(rss_up, 1),
                "pss_up_mib": round(pss_up, 1),
                "rss_after_mib": round(rss_after, 1),
                "pss_after_mib": round(pss_after, 1),
                "processes": procs_after,
            }
            if procs_up != procs_after:
                metrics["note"] = f"the tree had {procs_up} processes up, {procs_after} after"
            _stop_metrics(run, metrics)
            return Record(**base, ok=True, value=rss_after, metrics=metrics)
    except Exception as exc:
        return _failed(base, run, exc)
