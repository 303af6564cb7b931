"""A Celery app with rpc:// results and the tasks of `tests.e2e.rpc_app`, under the same names,
for a Celery worker subprocess (`celery -A tests.interop.celery_rpc_app worker`). The queue it
sends a chain's next steps to comes from $RPC_QUEUE."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from tests.e2e.rpc_app import wait_gate

app = Celery("rpc-interop", broker="pyamqp://guest:guest@127.0.0.1:5672//", backend="rpc://")
app.conf.worker_hijack_root_logger = False
app.conf.task_default_queue = os.environ.get("RPC_QUEUE", "celery")


@app.task(name="rpc.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="rpc.fail")
def fail(text: str) -> None:
    raise ValueError(text)


@app.task(name="rpc.flaky", bind=True, max_retries=5)
def flaky(self: Any, times: int) -> int:
    if self.request.retries < times:
        raise self.retry(countdown=0.1)
    return int(self.request.retries)


@app.task(name="rpc.gated")
def gated(gate: str, value: Any) -> Any:
    wait_gate(gate)
    return value


@app.task(name="rpc.slow")
def slow(seconds: float) -> float:
    time.sleep(seconds)  # the work itself: a task that takes long
    return seconds
