"""One trace from delay() in this process to the task body in a worker subprocess (solo pool)."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from millpond.testing.otlp import OtlpReceiver

pytestmark = pytest.mark.e2e


def test_publish_and_process_across_the_process_boundary(
    spawn_worker: Any, producer: Any, span_exporter: Any
) -> None:
    from tests.e2e.app import add

    queue = producer.settings.default_queue
    with OtlpReceiver() as receiver:
        env = {**receiver.env("e2e-worker"), "OTEL_BSP_SCHEDULE_DELAY": "50"}
        worker = spawn_worker("-P", "solo", env=env).wait_ready()
        span_exporter.clear()
        result = add.delay(20, 1)
        assert result.get(timeout=20) == 21
        publish = next(
            s
            for s in span_exporter.get_finished_spans()
            if s.name == f"publish {queue}" and s.attributes["messaging.message.id"] == result.id
        )
        spans = receiver.wait_for_spans(
            lambda got: f"process {queue}" in {s.name for s in got}, timeout=20
        )
        process = next(s for s in spans if s.name == f"process {queue}")
        assert process.trace_id == format(publish.context.trace_id, "032x")
        assert process.parent_span_id == format(publish.context.span_id, "016x")
        assert process.kind == "CONSUMER"
        assert process.attributes["messaging.message.id"] == result.id
        assert process.service_name == "e2e-worker"
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0
