"""Tasks the observability tests run in `millpond worker` subprocesses (and in-process)."""

from __future__ import annotations

import logging
import time

import structlog
from opentelemetry import trace

from millpond import Millpond

app = Millpond("obs")
log = structlog.get_logger("obs.tasks")
std = logging.getLogger("obs.user_code")


@app.task
def add(x: int, y: int) -> int:
    """Logs both ways and opens a span of its own, `add body`: the task body in the trace."""
    with trace.get_tracer("obs.user").start_as_current_span("add body"):
        log.info("adding", x=x, y=y)
        std.warning("stdlib line from user code: %s + %s", x, y)
        return x + y


@app.task
async def add_async(x: int, y: int) -> int:
    """`add` as a coroutine, for the asyncio pool: its own span is the task body in the trace."""
    with trace.get_tracer("obs.user").start_as_current_span("add body"):
        log.info("adding", x=x, y=y)
        std.warning("stdlib line from user code: %s + %s", x, y)
        return x + y


@app.task
def fail(message: str) -> None:
    raise ValueError(message)


@app.task(bind=True, max_retries=3)
def flaky(self, until: int = 1) -> int:  # type: ignore[no-untyped-def]
    if self.request.retries < until:
        self.retry(countdown=0.01)
    return int(self.request.retries)


@app.task
def nested() -> str:
    """Opens a span of its own: log lines inside it carry that span's id."""
    with trace.get_tracer("obs.user").start_as_current_span("user work"):
        log.info("inside the user span")
    return "ok"


@app.task
def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task
def noop() -> None:
    return None
