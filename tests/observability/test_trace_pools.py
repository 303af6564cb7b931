"""One trace from a producer process to the task body, on every pool, through real OTLP export.

A producer subprocess that sets up OpenTelemetry itself (its own `TracerProvider` with the
standard OTLP exporter, service obs-producer) sends a task that succeeds, one that fails and one
that retries once, to a `millpond worker` subprocess configured only by `OTEL_*` variables
(service obs-worker-<pool>) on the embedded sqlite broker; both export to the real OTLP/HTTP
receiver, which checks the whole tree the way Jaeger would show it. On the asyncio pool the
successful task is a coroutine.

Every span is an OpenTelemetry SDK span exported by the standard OTLP exporter (the request's
User-Agent says so). The tree is `publish` (producer) -> `process` (worker, around the pool's
`on_apply`) -> the spans the task body opens (`add body`), whichever process runs the body.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from millpond.testing.otlp import OtlpReceiver, ReceivedSpan
from tests.observability.conftest import POOLS, Proc, run_python

pytestmark = pytest.mark.e2e

PRODUCE = """
import json, os, sys
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

# the application's own OpenTelemetry set-up, as a web app would do it
provider = TracerProvider(resource=Resource.create({"service.name": "obs-producer"}))
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
    endpoint=os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] + "/v1/traces")))
trace.set_tracer_provider(provider)
from tests.observability.obs_app import add, add_async, fail, flaky
first = add_async if sys.argv[1:] == ["asyncio"] else add
ids = {"add": first.delay(2, 3).id, "fail": fail.delay("boom").id, "flaky": flaky.delay(1).id}
provider.shutdown()  # flushes the producer's spans
print(json.dumps(ids))
"""


def _one(spans: list[ReceivedSpan], **match: Any) -> ReceivedSpan:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, f"expected one span with {match}, got {len(found)}: {found}"
    return found[0]


def _by_message(spans: list[ReceivedSpan], task_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.attributes.get("messaging.message.id") == task_id]


SDK_AGENT = "OTel-OTLP-Exporter-Python/"


@pytest.mark.parametrize("pool", POOLS)
def test_publish_process_body_tree_on_every_pool(
    pool: str, spawn: Callable[..., Proc], obs_env: dict[str, str]
) -> None:
    queue = obs_env["MILLPOND_QUEUES"]
    worker_service = f"obs-worker-{pool}"
    with OtlpReceiver() as receiver:
        env = receiver.env(worker_service)
        worker = spawn("-P", pool, "-c", "1" if pool == "solo" else "2", env=env).wait_ready()
        ids = run_python(PRODUCE, {**obs_env, **receiver.env("obs-producer")}, args=[pool])

        def complete(spans: list[ReceivedSpan]) -> bool:
            counts = {key: len(_by_message(spans, task_id)) for key, task_id in ids.items()}
            # add, fail: publish + process; flaky: 2 publish + 2 process; and add's own span
            return counts == {"add": 2, "fail": 2, "flaky": 4} and any(
                s.name == "add body" for s in spans
            )

        spans = receiver.wait_for(complete, timeout=30, what=f"every span on the {pool} pool")
        assert worker.stop() == 0

    # -- the successful task: publish (producer) -> process (worker) -> add body (the task)
    add_name = "tests.observability.obs_app." + ("add_async" if pool == "asyncio" else "add")
    add = _by_message(spans, ids["add"])
    publish = _one(add, name=f"publish {queue}")
    process = _one(add, name=f"process {queue}")
    body = _one(spans, name="add body")
    assert publish.service_name == "obs-producer"
    assert process.service_name == body.service_name == worker_service
    assert publish.trace_id == process.trace_id == body.trace_id
    for span in (publish, process, body):
        assert span.user_agent.startswith(SDK_AGENT), span.user_agent
    assert process.parent_span_id == publish.span_id
    assert body.parent_span_id == process.span_id
    assert (publish.trace_id, publish.span_id) in process.links  # the conventions' link
    assert (publish.kind, process.kind, body.kind) == ("PRODUCER", "CONSUMER", "INTERNAL")
    assert publish.start_ns <= process.start_ns <= body.start_ns <= body.end_ns <= process.end_ns
    for span, operation_type in ((publish, "send"), (process, "process")):
        assert span.attributes["messaging.system"] == "sqlite"
        assert span.attributes["messaging.operation.type"] == operation_type
        assert span.attributes["messaging.destination.name"] == queue
        assert span.attributes["millpond.task.name"] == add_name
    assert publish.attributes["messaging.operation.name"] == "publish"
    assert process.attributes["messaging.operation.name"] == "process"
    assert process.attributes["millpond.pool"] == pool
    assert process.attributes["millpond.task.retries"] == 0
    assert process.attributes["millpond.message.delivery_count"] == 1
    assert process.attributes["millpond.task.state"] == "SUCCESS"
    assert 0 <= process.attributes["millpond.task.queue_wait_ms"] < 30_000
    assert process.status_code == "UNSET"

    # -- the failing task: the process span is an error carrying the exception
    fail = _by_message(spans, ids["fail"])
    process = _one(fail, name=f"process {queue}")
    assert process.status_code == "ERROR"
    assert process.attributes["error.type"] == "ValueError"
    assert "boom" in process.status_message
    assert "exception" in process.events
    assert process.attributes["millpond.task.state"] == "FAILURE"

    # -- the retried task: a retry event, a new publish from the worker, a second process
    flaky = _by_message(spans, ids["flaky"])
    assert len({s.trace_id for s in flaky}) == 1, "a retry stays in the task's trace"
    first_publish = _one(flaky, name=f"publish {queue}", service_name="obs-producer")
    retry_publish = _one(flaky, name=f"publish {queue}", service_name=worker_service)
    processes = sorted((s for s in flaky if s.name == f"process {queue}"), key=lambda s: s.start_ns)
    assert [p.attributes["millpond.task.retries"] for p in processes] == [0, 1]
    assert processes[0].parent_span_id == first_publish.span_id
    assert "retry" in processes[0].events
    assert processes[0].attributes["millpond.task.state"] == "RETRY"
    assert processes[0].status_code == "UNSET"  # a retry is not an error
    assert retry_publish.parent_span_id == processes[0].span_id
    assert retry_publish.attributes["millpond.task.retries"] == 1
    assert retry_publish.attributes["messaging.system"] == "sqlite"
    assert processes[1].parent_span_id == retry_publish.span_id
    assert processes[1].attributes["millpond.task.state"] == "SUCCESS"


def test_trace_link_starts_a_linked_trace(
    spawn: Callable[..., Proc], obs_env: dict[str, str]
) -> None:
    """trace_link = true: `process` roots a new trace whose only tie to `publish` is a link."""
    queue = obs_env["MILLPOND_QUEUES"]
    with OtlpReceiver() as receiver:
        worker = spawn(
            "-P",
            "threads",
            "-c",
            "2",
            env={**receiver.env("obs-worker"), "MILLPOND_TRACE_LINK": "true"},
        )
        worker.wait_ready()
        code = PRODUCE.replace('"fail": fail.delay("boom").id, "flaky": flaky.delay(1).id', "")
        ids = run_python(code, {**obs_env, **receiver.env("obs-producer")})
        spans = receiver.wait_for(
            lambda got: (
                len(_by_message(got, ids["add"])) == 2 and any(s.name == "add body" for s in got)
            ),
            timeout=30,
            what="the linked trace",
        )
        assert worker.stop() == 0
    add = _by_message(spans, ids["add"])
    publish = _one(add, name=f"publish {queue}")
    process = _one(add, name=f"process {queue}")
    body = _one(spans, name="add body")
    assert process.trace_id != publish.trace_id
    assert process.parent_span_id == ""
    assert process.links == ((publish.trace_id, publish.span_id),)
    assert body.trace_id == process.trace_id
    assert body.parent_span_id == process.span_id


def test_a_span_processor_added_in_the_app_module_sees_the_workers_spans(
    spawn: Callable[..., Proc], obs_env: dict[str, str]
) -> None:
    with OtlpReceiver() as receiver:
        worker = spawn(
            "-P",
            "threads",
            env=receiver.env("obs-processor"),
            app="tests.observability.obs_app_processor:app",
        ).wait_ready()
        code = PRODUCE.replace('"fail": fail.delay("boom").id, "flaky": flaky.delay(1).id', "")
        ids = run_python(code, {**obs_env, **receiver.env("obs-producer")})
        spans = receiver.wait_for(
            lambda got: (
                any(s.name == "add body" for s in got) and len(_by_message(got, ids["add"])) == 2
            ),
            timeout=30,
            what="the worker's spans",
        )
        assert worker.stop() == 0
    process = _one(_by_message(spans, ids["add"]), service_name="obs-processor")
    body = _one(spans, name="add body")
    assert process.attributes["obs.tagged_by"] == "user processor"
    assert body.attributes["obs.tagged_by"] == "user processor"
