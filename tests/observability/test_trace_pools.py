"""One trace from a producer process to the task body, on every pool, through real OTLP export.

A producer subprocess (OTEL_SERVICE_NAME=obs-producer, set up with `configure_tracing()`) sends a
task that succeeds, one that fails and one that retries once, to a `millpond worker` subprocess
(OTEL_SERVICE_NAME=obs-worker-<pool>) on the embedded sqlite broker; both export to the real
OTLP/HTTP receiver, which checks the whole tree the way Jaeger would show it.

The worker's `process` and `run` spans come from millpond's span recorder by default and from the
OpenTelemetry SDK with `trace_span_recorder = false`: the same tree is asserted for both, and the
request's User-Agent tells which one sent them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from millpond.testing.otlp import OtlpReceiver, ReceivedSpan
from tests.observability.conftest import POOLS, Proc, run_python

pytestmark = pytest.mark.e2e

PRODUCE = """
import json
from millpond.observability import configure_tracing, shutdown
assert configure_tracing(), "tracing should be on in the producer"
from tests.observability.obs_app import add, fail, flaky
ids = {"add": add.delay(2, 3).id, "fail": fail.delay("boom").id, "flaky": flaky.delay(1).id}
shutdown()  # flushes the producer's spans
print(json.dumps(ids))
"""


def _one(spans: list[ReceivedSpan], **match: Any) -> ReceivedSpan:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, f"expected one span with {match}, got {len(found)}: {found}"
    return found[0]


def _by_message(spans: list[ReceivedSpan], task_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.attributes.get("messaging.message.id") == task_id]


RECORDER_AGENT = "millpond-span-recorder/"
SDK_AGENT = "OTel-OTLP-Exporter-Python/"


@pytest.mark.parametrize("pool", POOLS)
def test_publish_process_run_tree_on_every_pool(
    pool: str, spawn: Callable[..., Proc], obs_env: dict[str, str]
) -> None:
    _check_tree(pool, spawn, obs_env, recorder=True)


def test_sdk_spans_make_the_same_tree(spawn: Callable[..., Proc], obs_env: dict[str, str]) -> None:
    """trace_span_recorder = false: the worker's spans are SDK spans, the tree is the same."""
    _check_tree("threads", spawn, obs_env, recorder=False)


def _check_tree(
    pool: str, spawn: Callable[..., Proc], obs_env: dict[str, str], *, recorder: bool
) -> None:
    queue = obs_env["MILLPOND_QUEUES"]
    worker_service = f"obs-worker-{pool}"
    with OtlpReceiver() as receiver:
        env = receiver.env(worker_service)
        if not recorder:
            env["MILLPOND_TRACE_SPAN_RECORDER"] = "false"
        worker = spawn("-P", pool, "-c", "1" if pool == "solo" else "2", env=env).wait_ready()
        ids = run_python(PRODUCE, {**obs_env, **receiver.env("obs-producer")})

        def complete(spans: list[ReceivedSpan]) -> bool:
            counts = {key: len(_by_message(spans, task_id)) for key, task_id in ids.items()}
            # add, fail: publish + process + run; flaky: 2 publish + 2 process + 2 run
            return counts == {"add": 3, "fail": 3, "flaky": 6}

        spans = receiver.wait_for(complete, timeout=30, what=f"every span on the {pool} pool")
        assert worker.terminate() == 0

    # -- the successful task: publish (producer) -> process (worker) -> run (worker)
    add = _by_message(spans, ids["add"])
    publish = _one(add, name=f"publish {queue}")
    process = _one(add, name=f"process {queue}")
    run = _one(add, name="run tests.observability.obs_app.add")
    assert publish.service_name == "obs-producer"
    assert process.service_name == run.service_name == worker_service
    assert publish.trace_id == process.trace_id == run.trace_id
    agent = RECORDER_AGENT if recorder else SDK_AGENT
    assert process.user_agent.startswith(agent), process.user_agent
    assert run.user_agent.startswith(agent), run.user_agent
    assert publish.user_agent.startswith(SDK_AGENT), publish.user_agent
    assert process.parent_span_id == publish.span_id
    assert run.parent_span_id == process.span_id
    assert (publish.trace_id, publish.span_id) in process.links  # the conventions' link
    assert (publish.kind, process.kind, run.kind) == ("PRODUCER", "CONSUMER", "INTERNAL")
    assert publish.start_ns <= process.start_ns <= run.start_ns <= run.end_ns <= process.end_ns
    for span, operation_type in ((publish, "send"), (process, "process")):
        assert span.attributes["messaging.system"] == "sqlite"
        assert span.attributes["messaging.operation.type"] == operation_type
        assert span.attributes["messaging.destination.name"] == queue
        assert span.attributes["millpond.task.name"] == "tests.observability.obs_app.add"
    assert publish.attributes["messaging.operation.name"] == "publish"
    assert process.attributes["messaging.operation.name"] == "process"
    assert process.attributes["millpond.pool"] == pool
    assert process.attributes["millpond.task.retries"] == 0
    assert process.attributes["millpond.message.delivery_count"] == 1
    assert process.attributes["millpond.task.state"] == "SUCCESS"
    assert 0 <= process.attributes["millpond.task.queue_wait_ms"] < 30_000
    assert process.status_code == run.status_code == "UNSET"

    # -- the failing task: both worker spans are errors, the run span has the exception
    fail = _by_message(spans, ids["fail"])
    process = _one(fail, name=f"process {queue}")
    run = _one(fail, name="run tests.observability.obs_app.fail")
    assert process.status_code == run.status_code == "ERROR"
    assert process.attributes["error.type"] == run.attributes["error.type"] == "ValueError"
    assert "boom" in process.status_message
    assert "boom" in run.status_message
    assert "exception" in run.events
    assert process.attributes["millpond.task.state"] == "FAILURE"

    # -- the retried task: a retry event, a new publish from the worker, a second process/run
    flaky = _by_message(spans, ids["flaky"])
    assert len({s.trace_id for s in flaky}) == 1, "a retry stays in the task's trace"
    first_publish = _one(flaky, name=f"publish {queue}", service_name="obs-producer")
    retry_publish = _one(flaky, name=f"publish {queue}", service_name=worker_service)
    processes = sorted((s for s in flaky if s.name == f"process {queue}"), key=lambda s: s.start_ns)
    runs = sorted((s for s in flaky if s.name.startswith("run ")), key=lambda s: s.start_ns)
    assert [p.attributes["millpond.task.retries"] for p in processes] == [0, 1]
    assert [r.attributes["millpond.task.retries"] for r in runs] == [0, 1]
    assert processes[0].parent_span_id == first_publish.span_id
    assert "retry" in processes[0].events
    assert "retry" in runs[0].events
    assert processes[0].attributes["millpond.task.state"] == "RETRY"
    assert processes[0].status_code == "UNSET"  # a retry is not an error
    assert retry_publish.parent_span_id == processes[0].span_id
    assert retry_publish.attributes["millpond.task.retries"] == 1
    assert retry_publish.attributes["messaging.system"] == "sqlite"
    assert processes[1].parent_span_id == retry_publish.span_id
    assert runs[1].parent_span_id == processes[1].span_id
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
            lambda got: len(_by_message(got, ids["add"])) == 3, timeout=30, what="the linked trace"
        )
        assert worker.terminate() == 0
    add = _by_message(spans, ids["add"])
    publish = _one(add, name=f"publish {queue}")
    process = _one(add, name=f"process {queue}")
    run = _one(add, name="run tests.observability.obs_app.add")
    assert process.trace_id != publish.trace_id
    assert process.parent_span_id == ""
    assert process.links == ((publish.trace_id, publish.span_id),)
    assert run.trace_id == process.trace_id
    assert run.parent_span_id == process.span_id
