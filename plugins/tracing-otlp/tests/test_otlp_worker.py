"""End to end: `millpond worker` with OTEL_TRACES_EXPORTER=millpond_otlp exports its spans to the
test OTLP receiver, and they are the spans the standard exporter delivers for the same tasks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from tests.observability.conftest import Proc, run_python

from millpond.testing.otlp import OtlpReceiver, ReceivedSpan
from millpond_otlp import USER_AGENT

pytestmark = pytest.mark.e2e

PRODUCE = """
import json
from millpond_tracing.otel import configure_tracing, shutdown
assert configure_tracing(), "tracing should be on in the producer"
from tests.observability.obs_app import add, fail, flaky
ids = {"add": add.delay(2, 3).id, "fail": fail.delay("boom").id, "flaky": flaky.delay(1).id}
shutdown()
print(json.dumps(ids))
"""

#: values that differ from run to run
VARYING = {"messaging.message.id", "millpond.task.queue_wait_ms", "messaging.destination.name"}


def _shape(span: ReceivedSpan, queue: str) -> tuple[Any, ...]:
    attributes = {k: v for k, v in span.attributes.items() if k not in VARYING}
    return (
        span.name.replace(queue, "<queue>"),
        span.kind,
        span.status_code,
        span.status_message,
        span.scope,
        span.service_name,
        tuple(sorted(attributes.items())),
        span.events,
        len(span.links),
        bool(span.parent_span_id),
    )


def _run(
    exporter: str, pool: str, spawn: Callable[..., Proc], obs_env: dict[str, str]
) -> tuple[list[ReceivedSpan], dict[str, str]]:
    with OtlpReceiver() as receiver:
        env = receiver.env("otlp-worker", OTEL_TRACES_EXPORTER=exporter)
        worker = spawn("-P", pool, "-c", "2", env=env).wait_ready()
        ids = run_python(PRODUCE, {**obs_env, **receiver.env("otlp-producer")})

        def complete(spans: list[ReceivedSpan]) -> bool:
            mine = [s for s in spans if s.service_name == "otlp-worker"]
            # process: add, fail, flaky twice; publish: flaky's retry; the body's own span
            return len(mine) == 6

        spans = receiver.wait_for(complete, timeout=30, what=f"the worker's spans ({exporter})")
        assert worker.stop() == 0
        assert not receiver.rejected
    return [s for s in spans if s.service_name == "otlp-worker"], ids


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_worker_spans_through_millpond_otlp(
    pool: str, spawn: Callable[..., Proc], obs_env: dict[str, str]
) -> None:
    queue = obs_env["MILLPOND_QUEUES"]
    fast, ids = _run("millpond_otlp", pool, spawn, obs_env)
    assert {s.user_agent for s in fast} == {USER_AGENT}  # the body's span too (a prefork child's)
    process = [s for s in fast if s.name == f"process {queue}"]
    assert sorted(s.attributes["messaging.message.id"] for s in process) == sorted(
        [ids["add"], ids["fail"], ids["flaky"], ids["flaky"]]
    )
    body = next(s for s in fast if s.name == "add body")
    add = next(s for s in process if s.attributes["messaging.message.id"] == ids["add"])
    assert body.parent_span_id == add.span_id
    assert body.trace_id == add.trace_id

    standard, _ = _run("otlp", pool, spawn, obs_env)
    assert {s.user_agent.split("/")[0] for s in standard} == {"OTel-OTLP-Exporter-Python"}
    assert sorted(_shape(s, queue) for s in fast) == sorted(_shape(s, queue) for s in standard)
