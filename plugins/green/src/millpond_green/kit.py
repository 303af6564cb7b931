"""The green-pool kit: test bodies shared by the gevent and eventlet suites (and any other green
pool's); each suite calls them with its pool's name.

They run in the suite's already-patched interpreter: import this module from test modules, after
the suite's conftest.py has patched, never from a conftest.py before that. `threading` here is the
patched module, so an Event or a Thread is a green one. Worker subprocesses run
`millpond_green.kit_app:app`; `start_worker` is the fixture of `millpond.testing.fixtures`.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import greenlet
import structlog
from opentelemetry import trace

from millpond import Millpond
from millpond.produce.task import current_request
from millpond.testing.harness import (
    REDIS_URL,
    WorkerProcess,
    assert_clean_stderr,
    forget_queue,
    sqlite_url,
    unique,
    wait_until,
)
from millpond.testing.otlp import OtlpReceiver
from millpond.testing.tasks import burn as burn_cpu

APP = "millpond_green.kit_app:app"
#: the prefix of the names of its tasks
TASKS = "millpond_green.kit_app"


def register_context_tasks(app: Millpond, expected: int) -> dict[str, Any]:
    """A task that logs, waits until `expected` copies of itself run at once, logs again and
    returns what it saw. All of them are suspended together, so every greenlet switch between
    them is a chance for context to leak."""
    log = structlog.get_logger("green.context")
    state: dict[str, Any] = {"running": 0, "peak": 0, "all_in": threading.Event()}

    @app.task(name="green.context")
    def context_probe(i: int) -> dict[str, Any]:
        log.info("context probe", i=i, phase="start")
        state["running"] += 1
        state["peak"] = max(state["peak"], state["running"])
        if state["running"] >= expected:
            state["all_in"].set()
        released = state["all_in"].wait(60)
        log.info("context probe", i=i, phase="end")
        state["running"] -= 1
        span = trace.get_current_span()
        ctx = span.get_span_context()
        parent = getattr(span, "parent", None)
        request = current_request()
        return {
            "i": i,
            "released": released,
            "trace_id": format(ctx.trace_id, "032x"),
            "span_id": format(ctx.span_id, "016x"),
            "parent_span_id": format(parent.span_id, "016x") if parent else None,
            "request_id": request.id if request else None,
            "log": dict(structlog.contextvars.get_contextvars()),
        }

    return state


def check_context_per_task(
    app: Millpond, start_worker: Any, exporter: Any, pool: str, count: int = 500
) -> None:
    """`count` tasks in flight at once on `pool`: each sees only its own trace and log context."""
    state = register_context_tasks(app, count)
    exporter.clear()
    # everything is queued before the worker starts, so it takes all of them in its first fetch
    sent = [app.send_task("green.context", (i,)) for i in range(count)]
    ids = [r.id for r in sent]
    with structlog.testing.capture_logs([structlog.contextvars.merge_contextvars]) as logs:
        running = start_worker(app, pool=pool, concurrency=count)
        results = [r.get(timeout=60) for r in sent]
        running.stop()

    assert state["peak"] == count, f"only {state['peak']} of {count} tasks ran at once"
    assert all(r["released"] for r in results), "some tasks timed out waiting for the others"

    spans = exporter.get_finished_spans()
    process = {
        s.attributes["messaging.message.id"]: s for s in spans if s.name.startswith("process ")
    }
    assert set(process) >= set(ids), f"{len(process)} process spans for {count} tasks"
    for i, (task_id, got) in enumerate(zip(ids, results, strict=True)):
        assert got["i"] == i
        assert got["request_id"] == task_id, "current_request() is another task's"
        process_ctx = process[task_id].context
        assert got["trace_id"] == format(process_ctx.trace_id, "032x")
        assert got["span_id"] == format(process_ctx.span_id, "016x"), (
            f"task {i} does not run inside its own process span"
        )
        assert got["log"]["task_id"] == task_id, f"task {i} sees another task's log context"
        assert got["log"]["trace_id"] == got["trace_id"]
        assert got["log"]["span_id"] == got["span_id"]

    lines = [e for e in logs if e.get("event") == "context probe"]
    assert len(lines) == 2 * count, f"{len(lines)} task log lines for {count} tasks"
    for line in lines:
        i = line["i"]
        assert line.get("task_id") == ids[i], (
            f"a line logged by task {i} ({line['phase']}) carries task_id {line.get('task_id')}"
        )
        assert line.get("task_name") == "green.context"
        assert line.get("span_id") == results[i]["span_id"]
        assert line.get("trace_id") == results[i]["trace_id"]


def check_otlp_export_flushed_at_shutdown(pool: str, directory: Path, count: int = 50) -> None:
    """A `millpond worker -P <pool>` exports its spans over OTLP/HTTP from a green exporter
    thread and flushes them at shutdown: with a ten-minute batch delay nothing is sent while the
    tasks run, and everything arrives once SIGTERM's warm shutdown is over."""
    broker, queue = sqlite_url(directory), unique("otlp")
    with OtlpReceiver() as receiver:
        env = {
            "MILLPOND_BROKER_URL": broker,
            "MILLPOND_QUEUES": queue,
            **receiver.env("green-worker", OTEL_BSP_SCHEDULE_DELAY="600000"),
        }
        worker = WorkerProcess(["-A", APP, "-P", pool, "-c", "50"], env, directory)
        producer = Millpond("producer", broker_url=broker, default_queue=queue, queues=[queue])
        try:
            worker.wait_ready()
            seen = producer.send_task(f"{TASKS}.probe").get(timeout=20)
            exporters = [t for t in seen["threads"] if t["name"].startswith("OtelBatch")]
            assert exporters, f"no OpenTelemetry batch exporter thread: {seen['threads']}"
            assert all(t["same_os_thread"] for t in seen["threads"]), (
                f"a real OS thread in a {pool} worker (created before patching?): {seen['threads']}"
            )
            sent = [producer.send_task(f"{TASKS}.step", (i, 0.05)) for i in range(count)]
            results = [r.get(timeout=30) for r in sent]
            assert [r["task_id"] for r in results] == [r.id for r in sent]
            assert receiver.spans == [], "spans were exported before shutdown despite the delay"
            assert worker.stop() == 0, worker.stderr()[-3000:]
        finally:
            worker.kill()
            producer.close()
        name = f"process {queue}"
        spans = receiver.wait_for(
            lambda got: sum(s.name == name for s in got) >= count, 10, "the flushed spans"
        )
    ids = [r.id for r in sent]
    process = {s.attributes["messaging.message.id"]: s for s in spans if s.name == name}
    for task_id in ids:
        assert task_id in process, f"the process span of task {task_id} is missing"
        assert process[task_id].service_name == "green-worker"
        assert process[task_id].attributes["millpond.pool"] == pool
    for line in worker.events("green step"):
        task_id = ids[line["n"]]
        assert line["task_id"] == task_id, f"task {line['n']} logged another task's id"
        assert line["span_id"] == process[task_id].span_id
        assert line["trace_id"] == process[task_id].trace_id
    assert len(worker.events("green step")) == 2 * count


class _SpyConsumer:
    """Wraps the worker's real consumer to record which greenlet makes each call."""

    def __init__(self, real: Any, calls: list[tuple[str, Any]]) -> None:
        self._real = real
        self._calls = calls

    def _record(self, name: str) -> None:
        self._calls.append((name, greenlet.getcurrent()))

    def fetch(self, *args: Any, **kwargs: Any) -> Any:
        self._record("fetch")
        return self._real.fetch(*args, **kwargs)

    def ack(self, *args: Any, **kwargs: Any) -> Any:
        self._record("ack")
        return self._real.ack(*args, **kwargs)

    def reject(self, *args: Any, **kwargs: Any) -> Any:
        self._record("reject")
        return self._real.reject(*args, **kwargs)

    def close(self) -> Any:
        self._record("close")
        return self._real.close()

    def stale(self, *args: Any, **kwargs: Any) -> Any:
        self._record("stale")
        return self._real.stale(*args, **kwargs)

    def resize(self, *args: Any, **kwargs: Any) -> Any:
        self._record("resize")
        return self._real.resize(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Anything else of the consumer contract (`connected`, ...) as the real one has it."""
        return getattr(self._real, name)


def green_app(broker_url: str, prefix: str) -> Millpond:
    """An app on a real broker with a unique queue; results in Redis (RabbitMQ keeps none)."""
    queue = unique(prefix)
    return Millpond(
        prefix,
        broker_url=broker_url,
        result_backend=REDIS_URL,
        result_expires=600,
        queues=[queue],
        default_queue=queue,
    )


def check_broker_io_in_one_greenlet(
    app: Millpond, start_worker: Any, pool: str, monkeypatch: Any, count: int = 200
) -> None:
    """Every consumer call (fetch, ack, reject, close) comes from the worker loop's greenlet,
    while the tasks run in other greenlets and publish from there (nested `.delay()`)."""
    calls: list[tuple[str, Any]] = []
    task_greenlets: set[int] = set()
    # The worker re-creates the app's broker from its settings: wrap the class's method.
    broker_cls = type(app.broker)
    real_consumer = broker_cls.consumer

    def consumer(self: Any, *args: Any, **kwargs: Any) -> _SpyConsumer:
        return _SpyConsumer(real_consumer(self, *args, **kwargs), calls)

    monkeypatch.setattr(broker_cls, "consumer", consumer)

    @app.task(name="green.leaf")
    def leaf(i: int) -> int:
        return i

    @app.task(name="green.branch")
    def branch(i: int) -> str:
        task_greenlets.add(id(greenlet.getcurrent()))
        time.sleep(0.02)
        return leaf.delay(i).id  # a publish from this task's greenlet

    sent = [branch.delay(i) for i in range(count)]
    running = start_worker(app, pool=pool, concurrency=50)
    children = [r.get(timeout=30) for r in sent]
    assert sorted(app.AsyncResult(c).get(timeout=30) for c in children) == list(range(count))
    running.stop()

    callers = {id(g) for _, g in calls}
    kinds = {name for name, _ in calls}
    assert {"fetch", "ack", "close"} <= kinds, kinds
    assert len(callers) == 1, f"the consumer was used from {len(callers)} greenlets"
    assert not callers & task_greenlets, "a task's greenlet called the consumer"
    assert len(task_greenlets) > 1


def check_heartbeats_while_tasks_yield(
    app: Millpond, start_worker: Any, pool: str, caplog: Any, *, hold: float, count: int = 20
) -> None:
    """Tasks that yield for longer than the broker's liveness window do not cost the worker its
    connection or lease: the broker's helper threads are greenlets and keep beating."""
    caplog.set_level(logging.WARNING, logger="millpond")

    @app.task(name="green.hold")
    def hold_for(seconds: float) -> int:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.05)  # yields to the hub
        request = current_request()
        return request.delivery_count if request else 0

    sent = [hold_for.delay(hold) for _ in range(count)]
    running = start_worker(app, pool=pool, concurrency=count)
    deliveries = [r.get(timeout=hold + 30) for r in sent]
    running.stop()
    assert deliveries == [1] * count, f"messages were redelivered: {deliveries}"
    noisy = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("millpond.broker")
        # Redis leases are checked server-wide: returning the messages of some other, dead
        # consumer on the shared server (another test's) says nothing about this one
        and not r.getMessage().startswith("redis: gave back")
        # the test server keeps no persistence, and a worker says so once at start-up
        and "keeps no append-only file" not in r.getMessage()
    ]
    assert not noisy, f"the broker complained while tasks yielded: {noisy}"


def check_a_task_that_never_yields_starves_the_heartbeat(
    app: Millpond, start_worker: Any, pool: str, caplog: Any, burn: float
) -> None:
    """The documented limit of green pools: a task computing without a yield for longer than
    the lease stops the lease keeper too, and the broker says so (the lease lapsed)."""
    caplog.set_level(logging.WARNING, logger="millpond")
    app.task(name="green.burn")(burn_cpu)
    result = app.send_task("green.burn", (burn,))
    running = start_worker(app, pool=pool, concurrency=4)
    assert result.get(timeout=burn + 30) > 0
    running.stop()
    lapsed = [r.getMessage() for r in caplog.records if "lease had lapsed" in r.getMessage()]
    assert lapsed, "the lease survived a task that never yielded: is the pool really green?"


def peak_overlap(spans: list[Any]) -> int:
    """The largest number of spans open at the same instant."""
    edges = sorted([(s.start_ns, 1) for s in spans] + [(s.end_ns, -1) for s in spans])
    peak = current = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak


def check_end_to_end(
    pool: str,
    broker_url: str,
    directory: Path,
    *,
    count: int = 2000,
    concurrency: int = 500,
    seconds: float = 0.1,
) -> dict[str, float]:
    """`millpond worker --pool <pool> --concurrency 500` runs `count` tasks that sleep, each
    inside its own `process` span, and every task log line (structlog's and the standard
    library's, which come out as JSON by default) carries its own task's ids. Returns figures
    for the test to print."""
    queue = unique(f"e2e-{pool}")
    settings: dict[str, Any] = {
        "broker_url": broker_url,
        "result_backend": REDIS_URL,
        "result_expires": 600,
        "queues": [queue],
        "default_queue": queue,
    }
    producer = Millpond("producer", **settings)
    sent: list[Any] = []
    try:
        with OtlpReceiver() as receiver:
            env = {
                "MILLPOND_BROKER_URL": broker_url,
                "MILLPOND_RESULT_BACKEND": REDIS_URL,
                "MILLPOND_RESULT_EXPIRES": "600",
                "MILLPOND_QUEUES": queue,
                "MILLPOND_DEFAULT_QUEUE": queue,
                **receiver.env("green-e2e"),
            }
            producer.broker.declare([queue])
            sent = [producer.send_task(f"{TASKS}.step", (i, seconds)) for i in range(count)]
            worker = WorkerProcess(
                ["-A", APP, "--pool", pool, "--concurrency", str(concurrency)], env, directory
            )
            try:
                worker.wait_ready()
                ready = time.monotonic()
                results = [r.get(timeout=60) for r in sent]
                drained = time.monotonic() - ready
                assert worker.stop() == 0, worker.stderr()[-3000:]
            finally:
                worker.kill()
            name = f"process {queue}"
            spans = receiver.wait_for(
                lambda got: sum(s.name == name for s in got) >= count,
                20,
                f"{count} process spans",
            )
    finally:
        producer.close()
        forget_queue(broker_url, queue, [r.id for r in sent])

    ids = [r.id for r in sent]
    assert [r["task_id"] for r in results] == ids
    assert [r["n"] for r in results] == list(range(count))
    process = {s.attributes["messaging.message.id"]: s for s in spans if s.name == name}
    assert len(process) == count, f"{len(process)} process spans for {count} tasks"
    for event in ("green step", "green stdlib step"):
        lines = worker.events(event)
        assert len(lines) == 2 * count, f"{len(lines)} {event!r} lines for {count} tasks"
        for line in lines:
            task_id = ids[line["n"]]
            assert line["task_id"] == task_id, (
                f"a line of task {line['n']} ({line['phase']}) carries task_id {line['task_id']}"
            )
            assert line["task_name"] == f"{TASKS}.step"
            assert line["span_id"] == process[task_id].span_id
            assert line["trace_id"] == process[task_id].trace_id
    assert {line["logger"] for line in worker.events("green stdlib step")} == {"green.user"}
    assert_clean_stderr(worker)
    peak = peak_overlap(list(process.values()))
    # Everything was queued before the worker started, so it could run `concurrency` at once; a
    # loaded machine may finish the first before it starts the last, hence a margin. Threads (16)
    # would top out at 16 and need 12.5 s.
    assert peak >= concurrency // 2, f"at most {peak} tasks ran at once, not {concurrency}"
    assert drained < count * seconds / 10, f"{count} tasks took {drained:.1f}s"
    return {"drained_s": drained, "tasks_per_s": count / drained, "peak_in_flight": peak}


def check_warm_shutdown_finishes_running_tasks(pool: str, directory: Path, count: int = 20) -> None:
    """SIGTERM while tasks sleep in their greenlets: they finish and are acknowledged, the
    worker exits 0, and nothing is left to redeliver."""
    broker, queue = sqlite_url(directory), unique("warm")
    env = {"MILLPOND_BROKER_URL": broker, "MILLPOND_QUEUES": queue}
    worker = WorkerProcess(["-A", APP, "-P", pool, "-c", str(count)], env, directory)
    producer = Millpond("producer", broker_url=broker, default_queue=queue, queues=[queue])
    try:
        worker.wait_ready()
        sent = [producer.send_task(f"{TASKS}.step", (i, 1.5)) for i in range(count)]
        wait_until(
            lambda: len(worker.events("green step")) >= count,
            20,
            f"{count} tasks to start",
        )
        assert worker.stop() == 0, worker.stderr()[-3000:]
        results = [r.get(timeout=10) for r in sent]
        assert [r["n"] for r in results] == list(range(count))
        assert producer.broker.queue_length(queue) == 0
    finally:
        worker.kill()
        producer.close()
    stopped = worker.events("worker stopped")
    assert stopped, worker.stderr()[-3000:]
    assert stopped[0]["shutdown"] == "warm"
    assert stopped[0]["processed"] == count
    phases = [line["phase"] for line in worker.events("green step")]
    assert phases.count("after") == count, "some tasks were cut short by the shutdown"
