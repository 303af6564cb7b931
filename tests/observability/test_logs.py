"""Log lines carry the task's context and its trace, structlog's and the standard library's alike;
a root logger the application configured is left alone, and `log_stdlib = false` leaves it be."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from millpond.testing.otlp import OtlpReceiver
from tests.observability.conftest import Proc, run_python

pytestmark = pytest.mark.e2e

ADD = "tests.observability.obs_app.add"
NESTED = "tests.observability.obs_app.nested"
PRODUCE = """
import json
from tests.observability.obs_app import add, nested
a, n = add.delay(2, 3), nested.delay()
print(json.dumps({"add": a.id, "add_result": a.get(timeout=20), "nested": n.id,
                  "nested_result": n.get(timeout=20)}))
"""


def _line(worker: Proc, **match: Any) -> dict[str, Any]:
    return worker.wait_line(
        lambda ln: all(ln.get(k) == v for k, v in match.items()), 20, f"a log line with {match}"
    )


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_task_log_lines_carry_task_and_trace_ids(
    pool: str, spawn: Callable[..., Proc], obs_env: dict[str, str]
) -> None:
    """structlog and user code's `logging` lines, by default in the same JSON format, with the
    task's ids and those of the span that was current (one the task opened itself here)."""
    with OtlpReceiver() as receiver:
        worker = spawn("-P", pool, "-c", "2", env=receiver.env("obs-logs")).wait_ready()
        ids = run_python(PRODUCE, obs_env)
        assert ids["add_result"] == 5
        assert ids["nested_result"] == "ok"
        spans = receiver.wait_for(
            lambda got: {"add body", "user work"} <= {s.name for s in got},
            timeout=20,
            what="the task bodies' spans",
        )
        structlog_line = _line(worker, event="adding", task_id=ids["add"])
        stdlib_line = _line(worker, event="stdlib line from user code: 2 + 3")
        nested_line = _line(worker, event="inside the user span")
        assert worker.stop() == 0

    body = next(s for s in spans if s.name == "add body")
    for line in (structlog_line, stdlib_line):
        assert line["task_id"] == ids["add"]
        assert line["task_name"] == ADD
        assert line["retries"] == 0
        assert line["trace_id"] == body.trace_id
        assert line["span_id"] == body.span_id
        assert "timestamp" in line
        assert line["level"] in ("info", "warning")
    assert structlog_line["logger"] == "obs.tasks"
    assert structlog_line["x"] == 2
    assert stdlib_line["logger"] == "obs.user_code"
    assert stdlib_line["level"] == "warning"
    user_span = next(s for s in spans if s.name == "user work")
    assert nested_line["span_id"] == user_span.span_id  # the current span, not just `process`
    assert nested_line["trace_id"] == user_span.trace_id
    assert nested_line["task_id"] == ids["nested"]


def test_log_stdlib_false_leaves_the_root_logger_alone(
    spawn: Callable[..., Proc], obs_env: dict[str, str]
) -> None:
    """With log_stdlib = false, user code's stdlib records are not reformatted (Python's own
    last-resort handler prints them), while millpond's lines stay JSON without trace ids
    (tracing is off)."""
    worker = spawn("-P", "solo", env={"MILLPOND_LOG_STDLIB": "false"}).wait_ready()
    ids = run_python(PRODUCE, obs_env)
    line = _line(worker, event="adding", task_id=ids["add"])
    assert "trace_id" not in line
    assert "span_id" not in line
    _line(worker, raw="stdlib line from user code: 2 + 3")  # plain text, not JSON
    assert worker.stop() == 0


def test_a_root_logger_the_app_configured_is_left_alone(
    spawn: Callable[..., Proc], obs_env: dict[str, str]
) -> None:
    """The app module calls `logging.basicConfig(...)`: its format wins for stdlib records."""
    worker = spawn("-P", "solo", app="tests.observability.obs_app_rootlog:app").wait_ready()
    ids = run_python(PRODUCE, obs_env)
    _line(worker, event="adding", task_id=ids["add"])  # millpond's own lines stay JSON
    _line(worker, raw="USER stdlib line from user code: 2 + 3")  # the app's format, not JSON
    assert worker.stop() == 0
