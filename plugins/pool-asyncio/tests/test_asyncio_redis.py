"""End to end on the real Redis: 2,000 `async def` tasks sleeping 100 ms, 500 at a time, each
seeing its own trace and log context. The tasks are queued first, then the worker starts in this
process (so its spans land in the test's exporter), on a unique queue."""

from __future__ import annotations

import time
from typing import Any

import async_tasks
import pytest

from millpond.produce.app import Millpond
from millpond.testing.fixtures import unique

REDIS_URL = "redis://127.0.0.1:6379/0"
TASKS = 2000
CONCURRENCY = 500
NAP = 0.1


@pytest.mark.redis
@pytest.mark.slow
def test_two_thousand_coroutines_on_redis_with_their_own_context(start_worker: Any) -> None:
    from millpond.testing.otel import memory_exporter

    exporter = memory_exporter()
    queue = unique("aio")
    async_tasks.reset()
    producer = Millpond("aio-producer", broker_url=REDIS_URL, default_queue=queue)
    try:
        # all of them wait in Redis first, so the worker has work for every slot at once
        handles = [producer.send_task("aio.nap", (NAP,)) for _ in range(TASKS)]
        started = time.monotonic()
        running = start_worker(
            async_tasks.app,
            broker_url=REDIS_URL,
            queues=[queue],
            default_queue=queue,
            pool="asyncio",
            concurrency=CONCURRENCY,
        )
        results = {h.id: h.get(timeout=60) for h in handles}
        elapsed = time.monotonic() - started
        assert running.stop() == 0
    finally:
        producer.close()
    print(
        f"\n{TASKS} async tasks of {NAP * 1000:g} ms at concurrency {CONCURRENCY} on Redis: "
        f"worker start to last result {elapsed:.2f}s ({TASKS / elapsed:,.0f} tasks/s), "
        f"peak {async_tasks.RUNNING['peak']} coroutines at once"
    )
    # really concurrent, never above the limit (serially this would take 200 s)
    assert async_tasks.RUNNING["peak"] <= CONCURRENCY
    assert async_tasks.RUNNING["peak"] >= CONCURRENCY // 2, async_tasks.RUNNING
    assert elapsed < 30, f"{TASKS} tasks took {elapsed:.1f}s"

    publish_trace = {
        s.attributes["messaging.message.id"]: format(s.context.trace_id, "032x")
        for s in exporter.get_finished_spans()
        if s.name == f"publish {queue}"
    }
    process_spans = {
        s.attributes["messaging.message.id"]: s
        for s in exporter.get_finished_spans()
        if s.name == f"process {queue}" and s.attributes["messaging.message.id"] in results
    }
    assert len(process_spans) == TASKS
    for task_id, got in results.items():
        trace_id = publish_trace[task_id]
        assert got["trace_id"] == trace_id, "the task ran outside its producer's trace"
        assert got["span_id"] == format(process_spans[task_id].context.span_id, "016x")
        assert got["request_id"] == task_id
        log = got["log"]
        assert log["task_id"] == task_id, "the log context carries another task's id"
        assert (log["trace_id"], log["span_id"]) == (trace_id, got["span_id"])
