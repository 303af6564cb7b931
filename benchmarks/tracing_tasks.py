"""The tasks `benchmarks/tracing_overhead.py` drains, in a millpond app built on first use.

    millpond worker -A benchmarks.tracing_tasks:app ...

`bench.noop` is the task measured. `bench.cpu_mark` starts and ends a drain: it reports the wall
clock and the worker process's CPU time (`time.process_time()`: every thread of the process, the
span export thread included) through the Redis side channel of `benchmarks.tasks`. The end mark
first exports every span the worker still holds (`force_flush` on the tracer provider, when there
is one), so the CPU of exporting the drain's spans is inside the measured interval; it takes the
wall clock before that, so the flush of the last partial batch does not count against throughput.
The marks also report the garbage collector's runs and CPU so far (a `gc.callbacks` clock), which
tells how much of a configuration's cost is collecting the objects its spans leave behind.

With `BENCH_SPANS_ONLY` set, the module installs a tracer provider whose exporter drops every span
(the `spans` configuration). Only the core's public API, OpenTelemetry and the standard library
are used here, so the worker of an older
millpond checkout (the untraced baseline) runs the same module.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from typing import Any

from benchmarks.tasks import noop, side

#: CPU seconds the garbage collector has spent in this process, per generation (it runs in
#: whichever thread allocated; each collection's start and stop are in that thread)
_gc_cpu = [0.0, 0.0, 0.0]
_gc_started = threading.local()


def _gc_clock(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_started.at = time.thread_time()
    else:
        _gc_cpu[info["generation"]] += time.thread_time() - getattr(_gc_started, "at", 0.0)


gc.callbacks.append(_gc_clock)


def cpu_mark(key: str, flush: bool = False) -> None:
    wall = time.time()
    if flush:
        from opentelemetry import trace

        force_flush = getattr(trace.get_tracer_provider(), "force_flush", None)
        if force_flush is not None:
            force_flush()
    cpu = time.process_time()
    mark = {
        "wall": wall,
        "cpu": cpu,
        "pid": os.getpid(),
        "discarded": _discarded[0],
        "gc_cpu": list(_gc_cpu),
        "gc_runs": [g["collections"] for g in gc.get_stats()],
    }
    side().rpush(key, json.dumps(mark))


#: spans the `spans` configuration's exporter was handed (and dropped)
_discarded = [0]


def _spans_only() -> None:
    """The `spans` configuration: SDK spans on a provider installed here, before the worker looks
    for one, whose batch processor hands them to an exporter that drops them unencoded. It
    measures making spans apart from exporting them."""
    from collections.abc import Sequence

    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Discard(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            _discarded[0] += len(spans)
            return SpanExportResult.SUCCESS

    provider = TracerProvider(resource=Resource.create({"service.name": "bench-worker"}))
    provider.add_span_processor(BatchSpanProcessor(Discard()))  # OTEL_BSP_* from the environment
    trace.set_tracer_provider(provider)


def _app() -> Any:
    from millpond import Millpond

    if os.environ.get("BENCH_SPANS_ONLY"):
        _spans_only()
    millpond_app = Millpond("bench")
    millpond_app.task(name="bench.noop", ignore_result=True)(noop)
    millpond_app.task(name="bench.cpu_mark", ignore_result=True)(cpu_mark)
    return millpond_app


def __getattr__(name: str) -> Any:
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()["app"] = _app()
    return value
