"""Worker metrics: counted by millpond in-process, handed to OpenTelemetry when it collects.

What is measured, all in the worker's main process (the consumer loop sees every job start and
end, whatever pool ran it, so prefork children need no metrics of their own):

| instrument                  | kind                  | unit   | attributes                   |
|-----------------------------|-----------------------|--------|------------------------------|
| millpond.task.received      | counter               | {task} | task name, queue             |
| millpond.task.succeeded     | counter               | {task} | task name, queue             |
| millpond.task.failed        | counter               | {task} | task name, queue, state      |
| millpond.task.retried       | counter               | {task} | task name, queue             |
| millpond.task.rejected      | counter               | {task} | task name, queue, state      |
| millpond.task.duration      | histogram             | s      | task name, queue, state      |
| millpond.task.queue_wait    | histogram             | s      | task name, queue             |
| millpond.task.active        | gauge                 | {task} | pool                         |
| millpond.task.prefetched    | gauge                 | {task} | pool                         |
| millpond.pool.size          | gauge                 | {unit} | pool                         |
| millpond.queue.ready        | gauge                 | {message} | queue                     |
| millpond.queue.reserved     | gauge                 | {message} | queue                     |
| millpond.queue.running      | gauge                 | {task} | queue                        |
| millpond.queue.load         | gauge                 | {message}/{slot} | queue              |

The `millpond.queue.*` gauges are the autoscaling signal: `ready` is what the broker holds for
the queue (asked at collection time, at most once a second per queue, from the collecting
thread), `reserved` and `running` are this worker's own (its buffer and its pool), and `load` is
`(ready + reserved + running) / pool size`: above 1, this worker alone cannot keep up. A fleet's
load is `(max(ready) + sum(reserved + running)) / sum(pool size)` over its workers (the PromQL in
docs/autoscaling.md).

Why not call the SDK's `counter.add()` per task: on the reference machine each SDK recording
costs about 15 µs (attribute cleaning, hashing, exemplar sampling), four per task, which halved
no-op throughput. Instead the loop thread adds to plain dicts under one lock (well under a
microsecond per recording) and OpenTelemetry reads the totals when it collects:

* counters and gauges are *observable* instruments of the metrics API: any meter provider,
  the application's own included, exports them;
* histograms are aggregated here (explicit buckets, cumulative) and injected into what the
  exporters millpond installed send (`MergingExporter`, and the Prometheus text endpoint). With a
  meter provider the application installed itself, millpond cannot reach its exporters, so the two
  histograms are recorded through the API per task instead: correct, just slower.

`MetricsHooks` (in this package's `__init__`) calls the recording functions from the worker's
hooks; with metrics off it switches itself out of the hook chain, so they cost nothing then.

`PrometheusText` renders a collection in the Prometheus text format (0.0.4), so `/metrics` works
without the optional `opentelemetry-exporter-prometheus` package (and its `prometheus_client`).
"""

from __future__ import annotations

import math
import re
import threading
import time
import weakref
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from millpond import __version__
from millpond.exceptions import NotSupported
from millpond.states import FAILED_STATES, TaskState

if TYPE_CHECKING:
    from millpond.contracts.hooks import WorkerView as Worker
    from millpond.contracts.pool import Job, Outcome

ENABLED = False

TASK_NAME = "millpond.task.name"
QUEUE = "messaging.destination.name"
STATE = "millpond.task.state"
POOL = "millpond.pool"
SCOPE = "millpond"

#: seconds: from a fast no-op task to an hour-long batch job
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)
#: at most this many attribute sets per instrument: a flood of bogus task names cannot eat memory
MAX_SERIES = 2000

COUNTERS = {
    "millpond.task.received": "Task messages received and decoded by the worker.",
    "millpond.task.succeeded": "Tasks that returned a result.",
    "millpond.task.failed": "Tasks that failed (state FAILURE), lost their execution unit (LOST) "
    "or hit their hard time limit (TIMEOUT).",
    "millpond.task.retried": "Task runs that asked to be retried.",
    "millpond.task.rejected": "Tasks that rejected their message (REJECTED) or were revoked or "
    "expired (REVOKED).",
}
HISTOGRAMS = {
    "millpond.task.duration": "Time the task body ran, by outcome state.",
    "millpond.task.queue_wait": "Time from publishing to the start of the run: broker queue "
    "plus the worker's prefetch buffer (from the millpond_sent_at "
    "header, which millpond producers set).",
}
_FAILED = FAILED_STATES
_REJECTED = frozenset({TaskState.REJECTED, TaskState.REVOKED})
_OVERFLOW = ("(other)", "(other)", "")


class _Histogram:
    """Explicit-bucket histogram state of one attribute set (upper-inclusive buckets, like OTel)."""

    __slots__ = ("count", "counts", "max", "min", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, value: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, value)] += 1
        self.count += 1
        self.sum += value
        self.min = min(self.min, value)
        self.max = max(self.max, value)


# -- state (written by the consumer loop, read by collectors under the same lock) ----------------
_lock = threading.Lock()
_counts: dict[str, dict[tuple[str, str, str], int]] = {name: {} for name in COUNTERS}
_histograms: dict[str, dict[tuple[str, str, str], _Histogram]] = {n: {} for n in HISTOGRAMS}
_direct: dict[str, Any] = {}  # API histograms, when the meter provider is not millpond's
_start_ns = time.time_ns()
_workers: weakref.WeakSet[Worker] = weakref.WeakSet()
#: queue -> (ready count, monotonic time it was read): the broker is asked at most once a second
_ready: dict[str, tuple[int, float]] = {}
READY_MAX_AGE = 1.0
_provider: Any = None


def _key(
    table: Mapping[tuple[str, str, str], Any], task: str, queue: str, state: str
) -> tuple[str, str, str]:
    key = (task, queue, state)
    if key not in table and len(table) >= MAX_SERIES:
        return _OVERFLOW
    return key


def _attrs(key: tuple[str, str, str]) -> dict[str, str]:
    attrs = {TASK_NAME: key[0], QUEUE: key[1]}
    if key[2]:
        attrs[STATE] = key[2]
    return attrs


def _count(name: str, task: str, queue: str, state: str = "") -> None:
    table = _counts[name]
    with _lock:
        key = _key(table, task, queue, state)
        table[key] = table.get(key, 0) + 1


def _observe(name: str, value: float, task: str, queue: str, state: str = "") -> None:
    direct = _direct.get(name)
    if direct is not None:
        direct.record(value, _attrs((task, queue, state)))
        return
    table = _histograms[name]
    with _lock:
        key = _key(table, task, queue, state)
        histogram = table.get(key)
        if histogram is None:
            histogram = table[key] = _Histogram()
        histogram.add(value)


# -- recording (from MetricsHooks) --------------------------------------------------
def received(job: Job) -> None:
    _count("millpond.task.received", job.task_name, job.queue)


def started(job: Job) -> None:
    """The job goes to the pool now: record its queue wait."""
    sent_at = job.sent_at
    if sent_at is not None:
        wait = max(0.0, time.time() - sent_at)
        _observe("millpond.task.queue_wait", wait, job.task_name, job.queue)


def finished(job: Job, outcome: Outcome) -> None:
    state = outcome.state
    if state == "SUCCESS":
        _count("millpond.task.succeeded", job.task_name, job.queue)
    elif state == "RETRY":
        _count("millpond.task.retried", job.task_name, job.queue)
    elif state in _REJECTED:
        _count("millpond.task.rejected", job.task_name, job.queue, state)
    else:  # FAILURE, LOST, TIMEOUT, or a third-party pool's own state: a failure, named
        _count("millpond.task.failed", job.task_name, job.queue, state)
    if outcome.runtime:
        _observe("millpond.task.duration", outcome.runtime, job.task_name, job.queue, state)


# -- installing -----------------------------------------------------------------------------------
def is_real_provider(provider: Any) -> bool:
    """Whether `provider` records anything (not the API's proxy or no-op default)."""
    from opentelemetry.metrics import NoOpMeterProvider

    return not (
        isinstance(provider, NoOpMeterProvider) or type(provider).__name__ == "_ProxyMeterProvider"
    )


def install(provider: Any = None, *, aggregate_histograms: bool = False) -> bool:
    """Register millpond's instruments on `provider` (default: the global meter provider).

    `aggregate_histograms`: millpond installed this provider with `MergingExporter` readers (or
    renders it for Prometheus), so histograms stay aggregated here. Returns whether metrics
    are on; idempotent per provider.
    """
    global ENABLED, _provider
    from opentelemetry import metrics as otel_metrics

    provider = provider if provider is not None else otel_metrics.get_meter_provider()
    if not is_real_provider(provider):
        ENABLED = False
        return False
    if provider is _provider:
        ENABLED = True
        return True
    meter = provider.get_meter(SCOPE, __version__)
    for name, description in COUNTERS.items():
        meter.create_observable_counter(name, [_counter_callback(name)], "{task}", description)
    meter.create_observable_gauge(
        "millpond.task.active",
        [_gauge_callback(lambda w, p: p.active)],
        "{task}",
        "Tasks running (or handed to the pool) right now.",
    )
    meter.create_observable_gauge(
        "millpond.task.prefetched",
        [_gauge_callback(lambda w, p: len(w.buffer))],
        "{task}",
        "Messages fetched and held by the worker, waiting for a free pool slot.",
    )
    meter.create_observable_gauge(
        "millpond.pool.size",
        [_gauge_callback(lambda w, p: p.concurrency)],
        "{unit}",
        "Execution units of the pool (its concurrency).",
    )
    for name, unit, description, read in _QUEUE_GAUGES:
        meter.create_observable_gauge(name, [_queue_callback(read)], unit, description)
    _direct.clear()
    if not aggregate_histograms:
        for name, description in HISTOGRAMS.items():
            _direct[name] = meter.create_histogram(
                name, "s", description, explicit_bucket_boundaries_advisory=DURATION_BUCKETS
            )
    _provider = provider
    ENABLED = True
    return True


def disable() -> None:
    """Stop recording (tests, or a worker shutting its meter provider down)."""
    global ENABLED, _provider
    ENABLED = False
    _provider = None
    _direct.clear()


def reset() -> None:
    """Forget every total (tests)."""
    global _start_ns
    with _lock:
        for table in _counts.values():
            table.clear()
        for hist_table in _histograms.values():
            hist_table.clear()
        _start_ns = time.time_ns()


def observe(worker: Worker) -> None:
    """Report this worker's pool in the observed gauges (held weakly)."""
    _workers.add(worker)


def _counter_callback(name: str) -> Any:
    def callback(_options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        with _lock:
            items = list(_counts[name].items())
        return [Observation(value, _attrs(key)) for key, value in items]

    return callback


def _gauge_callback(read: Any) -> Any:
    def callback(_options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        out = []
        for worker in list(_workers):
            pool = worker.pool
            if pool is not None:
                out.append(
                    Observation(read(worker, pool), {POOL: pool.name or worker.settings.pool})
                )
        return out

    return callback


def _ready_count(worker: Worker, queue: str) -> int | None:
    """The broker's ready count for `queue`, cached for `READY_MAX_AGE`; None when the broker
    cannot tell or cannot be reached now (the gauge then skips the queue for this collection)."""
    now = time.monotonic()
    cached = _ready.get(queue)
    if cached is not None and now - cached[1] < READY_MAX_AGE:
        return cached[0]
    try:
        ready = int(worker.app.broker.queue_stats(queue).ready)
    except NotSupported:
        return None
    except Exception as exc:  # a collection must never fail: the gauge misses one reading
        import structlog

        structlog.get_logger("millpond.metrics").debug(
            "cannot read the queue's ready count", queue=queue, error=f"{type(exc).__name__}: {exc}"
        )
        return None
    _ready[queue] = (ready, now)
    return ready


def _busy_by_queue(worker: Worker, pool: Any) -> dict[str, tuple[int, int]]:
    """Per consumed queue: (messages in the worker's buffer, jobs in its pool)."""
    held = Counter(job.queue for job in list(worker.buffer))  # one C call: safe from this thread
    busy = Counter(job.queue for job in pool.active_jobs())
    return {q: (held[q], busy[q]) for q in dict.fromkeys([*worker.queues, *held, *busy])}


def _queue_callback(read: Any) -> Any:
    """Observations per (worker, queue) of `read(ready, reserved, running, slots)`."""

    def callback(_options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        out = []
        for worker in list(_workers):
            pool = worker.pool
            if pool is None:
                continue
            slots = max(1, int(pool.concurrency))
            for queue, (reserved, running) in _busy_by_queue(worker, pool).items():
                value = read(lambda q=queue, w=worker: _ready_count(w, q), reserved, running, slots)
                if value is not None:
                    out.append(Observation(value, {QUEUE: queue}))
        return out

    return callback


def _load(ready: Any, reserved: int, running: int, slots: int) -> float | None:
    count = ready()
    return None if count is None else (count + reserved + running) / slots


_QUEUE_GAUGES = (
    (
        "millpond.queue.ready",
        "{message}",
        "Messages the broker holds ready for the queue (asked at most once a second).",
        lambda ready, reserved, running, slots: ready(),
    ),
    (
        "millpond.queue.reserved",
        "{message}",
        "Messages of the queue this worker fetched and holds, waiting for a free pool slot.",
        lambda ready, reserved, running, slots: reserved,
    ),
    (
        "millpond.queue.running",
        "{task}",
        "Tasks of the queue this worker's pool runs now.",
        lambda ready, reserved, running, slots: running,
    ),
    (
        "millpond.queue.load",
        "{message}/{slot}",
        "(ready + reserved + running) / pool size: the autoscaling signal; above 1 this worker "
        "alone cannot keep up.",
        _load,
    ),
)


# -- handing the aggregated histograms to the SDK -------------------------------------------------
def _histogram_snapshot() -> dict[
    str, list[tuple[tuple[str, str, str], int, float, list[int], float, float]]
]:
    with _lock:
        return {
            name: [(key, h.count, h.sum, list(h.counts), h.min, h.max) for key, h in table.items()]
            for name, table in _histograms.items()
        }


def histogram_metrics(
    delta_from: dict[Any, Any] | None = None, since_ns: int | None = None
) -> list[Any]:
    """The aggregated histograms as SDK `Metric`s (cumulative, or delta against `delta_from`,
    which is updated: pass the same dict on every export)."""
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Histogram,
        HistogramDataPoint,
        Metric,
    )

    now = time.time_ns()
    out: list[Any] = []
    for name, series in _histogram_snapshot().items():
        points = []
        for key, count, total, counts, low, high in series:
            start = _start_ns
            if delta_from is not None:
                last = delta_from.get((name, key))
                delta_from[(name, key)] = (count, total, counts, now)
                if last is not None:
                    count, total = count - last[0], total - last[1]
                    counts = [a - b for a, b in zip(counts, last[2], strict=True)]
                    start = last[3]
                elif since_ns is not None:
                    start = since_ns
                low, high = math.nan, math.nan  # unknown per interval
            if delta_from is not None and count == 0:
                continue
            points.append(
                HistogramDataPoint(
                    attributes=_attrs(key),
                    start_time_unix_nano=start,
                    time_unix_nano=now,
                    count=count,
                    sum=total,
                    bucket_counts=counts,
                    explicit_bounds=list(DURATION_BUCKETS),
                    min=low if count and not math.isnan(low) else None,  # type: ignore[arg-type]
                    max=high if count and not math.isnan(high) else None,  # type: ignore[arg-type]
                    exemplars=[],
                )
            )
        if points:
            temporality = (
                AggregationTemporality.DELTA
                if delta_from is not None
                else AggregationTemporality.CUMULATIVE
            )
            out.append(
                Metric(
                    name=name,
                    description=HISTOGRAMS[name],
                    unit="s",
                    data=Histogram(data_points=points, aggregation_temporality=temporality),
                )
            )
    return out


def merge_into(data: Any, extra: Sequence[Any], resource: Any) -> Any:
    """`data` (SDK MetricsData, possibly None) with `extra` metrics added under millpond's scope."""
    from opentelemetry.sdk.metrics.export import MetricsData, ResourceMetrics, ScopeMetrics
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    if not extra:
        return data
    resource_metrics = list(getattr(data, "resource_metrics", None) or [])
    if not resource_metrics:
        scope = InstrumentationScope(SCOPE)
        return MetricsData([ResourceMetrics(resource, [ScopeMetrics(scope, list(extra), "")], "")])
    first = resource_metrics[0]
    scopes = list(first.scope_metrics)
    for i, sm in enumerate(scopes):
        if sm.scope.name == SCOPE:
            scopes[i] = ScopeMetrics(sm.scope, [*sm.metrics, *extra], sm.schema_url)
            break
    else:
        scopes.append(ScopeMetrics(InstrumentationScope(SCOPE), list(extra), ""))
    resource_metrics[0] = ResourceMetrics(first.resource, scopes, first.schema_url)
    return MetricsData(resource_metrics)


def merging_exporter(inner: Any, resource: Any) -> Any:
    """Wrap an SDK MetricExporter so every export also carries millpond's histograms."""
    from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
    from opentelemetry.sdk.metrics.export import AggregationTemporality, MetricExporter

    class MergingExporter(MetricExporter):
        def __init__(self) -> None:
            super().__init__(
                preferred_temporality=getattr(inner, "_preferred_temporality", None),
                preferred_aggregation=getattr(inner, "_preferred_aggregation", None),
            )
            wanted = (getattr(inner, "_preferred_temporality", None) or {}).get(
                HistogramInstrument, AggregationTemporality.CUMULATIVE
            )
            self._delta: dict[Any, Any] | None = (
                {} if wanted == AggregationTemporality.DELTA else None
            )
            self._since = time.time_ns()

        def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> Any:
            extra = histogram_metrics(self._delta, self._since)
            return inner.export(
                merge_into(metrics_data, extra, resource), timeout_millis=timeout_millis, **kwargs
            )

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return bool(inner.force_flush(timeout_millis=timeout_millis))

        def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
            inner.shutdown(timeout_millis=timeout_millis, **kwargs)

    return MergingExporter()


# -- Prometheus text ------------------------------------------------------------------------------
_UNITS = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "1": "ratio"}
_BAD_NAME = re.compile(r"[^a-zA-Z0-9_:]")
_BAD_LABEL = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_name(name: str, unit: str, *, counter: bool) -> str:
    """An OpenTelemetry instrument name as Prometheus spells it (units and `_total` suffixed)."""
    out = _BAD_NAME.sub("_", name)
    if unit and not unit.startswith("{"):
        suffix = _UNITS.get(unit, _BAD_NAME.sub("_", unit))
        if not out.endswith("_" + suffix):
            out = f"{out}_{suffix}"
    if counter and not out.endswith("_total"):
        out += "_total"
    if out[:1].isdigit():
        out = "_" + out
    return out


def _label_name(key: str) -> str:
    out = _BAD_LABEL.sub("_", key)
    return "_" + out if out[:1].isdigit() else out


def _label_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(attrs: Any, extra: dict[str, str] | None = None) -> str:
    pairs = [f'{_label_name(k)}="{_label_value(v)}"' for k, v in sorted(dict(attrs).items())]
    if extra:
        pairs += [f'{k}="{_label_value(v)}"' for k, v in extra.items()]
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return str(value)


class PrometheusText:
    """Renders an SDK `InMemoryMetricReader`'s collection, plus millpond's aggregated
    histograms, as Prometheus text (0.0.4)."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, reader: Any, resource: Any = None) -> None:
        self.reader = reader
        self.resource = resource

    def render(self) -> str:
        data = merge_into(self.reader.get_metrics_data(), histogram_metrics(), self.resource)
        lines: list[str] = []
        for rm in getattr(data, "resource_metrics", None) or ():
            attrs = {
                k: v
                for k, v in rm.resource.attributes.items()
                if k
                in ("service.name", "service.namespace", "service.instance.id", "service.version")
            }
            lines += [
                "# HELP target_info Target metadata",
                "# TYPE target_info gauge",
                f"target_info{_labels(attrs)} 1",
            ]
            break
        seen: set[str] = set()
        for rm in getattr(data, "resource_metrics", None) or ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    lines += self._metric(metric, seen)
        return "\n".join(lines) + "\n"

    def _metric(self, metric: Any, seen: set[str]) -> Iterator[str]:
        from opentelemetry.sdk.metrics.export import Gauge, Histogram, Sum

        body = metric.data
        if isinstance(body, Histogram):
            name, kind = prometheus_name(metric.name, metric.unit, counter=False), "histogram"
        elif isinstance(body, Sum) and body.is_monotonic:
            name, kind = prometheus_name(metric.name, metric.unit, counter=True), "counter"
        elif isinstance(body, Sum | Gauge):
            name, kind = prometheus_name(metric.name, metric.unit, counter=False), "gauge"
        else:
            return
        if name not in seen:
            seen.add(name)
            yield f"# HELP {name} {metric.description}".rstrip()
            yield f"# TYPE {name} {kind}"
        for point in body.data_points:
            if kind != "histogram":
                yield f"{name}{_labels(point.attributes)} {_number(point.value)}"
                continue
            running = 0
            for bound, count in zip(point.explicit_bounds, point.bucket_counts, strict=False):
                running += count
                le = {"le": _number(float(bound))}
                yield f"{name}_bucket{_labels(point.attributes, le)} {running}"
            yield f"{name}_bucket{_labels(point.attributes, {'le': '+Inf'})} {point.count}"
            yield f"{name}_sum{_labels(point.attributes)} {_number(point.sum)}"
            yield f"{name}_count{_labels(point.attributes)} {point.count}"
