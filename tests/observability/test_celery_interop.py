"""A Celery producer traced by Celery's own OpenTelemetry instrumentation, and a millpond worker
on the same Redis queue: the worker's `process` span continues the Celery producer's trace."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from millpond.testing.otlp import OtlpReceiver
from tests.observability.conftest import Proc, run_python

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

REDIS_DB = 0  # kombu's layout: the queue is the list named after it; unique per test

CELERY_PRODUCER = """
import json, os
from celery import Celery
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from millpond_tracing.otel import configure_tracing, shutdown

assert configure_tracing(), "tracing should be on in the Celery producer"
CeleryInstrumentor().instrument()
celery = Celery("shop", broker=os.environ["CELERY_BROKER"])
celery.conf.task_default_queue = os.environ["QUEUE"]
result = celery.send_task("tests.observability.obs_app.add", args=(20, 22),
                          queue=os.environ["QUEUE"])
shutdown()
print(json.dumps(result.id))
"""


def test_celery_instrumented_producer_continues_into_a_millpond_worker(
    spawn: Callable[..., Proc], obs_env: dict[str, str]
) -> None:
    queue = f"obs-celery-{uuid.uuid4().hex[:10]}"
    broker = f"redis://127.0.0.1:6379/{REDIS_DB}"
    redis_env = {
        "MILLPOND_BROKER_URL": broker,
        "MILLPOND_QUEUES": queue,
        "MILLPOND_DEFAULT_QUEUE": queue,
    }
    with OtlpReceiver() as receiver:
        worker = spawn(
            "-P", "threads", "-c", "2", env={**redis_env, **receiver.env("millpond-worker")}
        ).wait_ready()
        task_id = run_python(
            CELERY_PRODUCER,
            {
                **obs_env,
                **receiver.env("celery-producer"),
                "CELERY_BROKER": broker,
                "QUEUE": queue,
            },
        )

        def tree(spans: list) -> bool:  # type: ignore[type-arg]
            names = {s.name for s in spans if s.attributes.get("messaging.message.id") == task_id}
            return f"process {queue}" in names and any(s.name == "add body" for s in spans)

        spans = receiver.wait_for(tree, timeout=30, what="the worker's spans of the Celery task")
        assert worker.stop() == 0

    (celery_publish,) = [s for s in spans if s.service_name == "celery-producer"]
    assert celery_publish.kind == "PRODUCER"
    assert celery_publish.name == "apply_async/tests.observability.obs_app.add"
    process = next(s for s in spans if s.name == f"process {queue}")
    body = next(s for s in spans if s.name == "add body")
    assert process.service_name == body.service_name == "millpond-worker"
    assert process.trace_id == body.trace_id == celery_publish.trace_id
    assert process.parent_span_id == celery_publish.span_id
    assert body.parent_span_id == process.span_id
    assert process.attributes["messaging.system"] == "redis"
    assert process.attributes["messaging.message.id"] == task_id
    assert process.attributes["millpond.task.state"] == "SUCCESS"
