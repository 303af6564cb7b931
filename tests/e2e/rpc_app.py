"""Tasks for the rpc:// tests, run by `millpond worker` subprocesses (`tests.e2e.rpc_app:app`).

`tests/interop/celery_rpc_app.py` declares the same names for a Celery worker. The gate lets a
test hold a task until it says go: the task blocks on a RabbitMQ queue (no polling) until the
test publishes to it, within a bounded time.
"""

from __future__ import annotations

import time
from typing import Any

import amqp

from millpond import Millpond

AMQP_HOST = "127.0.0.1:5672"

app = Millpond("rpc")


def declare_gate(gate: str) -> None:
    """Create the gate queue before the task that waits on it is sent (so opening it early is
    never lost)."""
    with amqp.Connection(AMQP_HOST, userid="guest", password="guest") as conn:
        conn.channel().queue_declare(gate, durable=False, auto_delete=False)


def open_gate(gate: str) -> None:
    with amqp.Connection(AMQP_HOST, userid="guest", password="guest") as conn:
        conn.channel().basic_publish(amqp.Message(b"go"), exchange="", routing_key=gate)


def wait_gate(gate: str, within: float = 60.0) -> None:
    """Block until the gate is opened (a message on its queue); the test deletes it."""
    with amqp.Connection(AMQP_HOST, userid="guest", password="guest") as conn:
        chan = conn.channel()
        got: list[Any] = []
        chan.basic_consume(gate, no_ack=True, callback=got.append)
        deadline = time.monotonic() + within
        while not got:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"gate {gate} was not opened within {within} s")
            try:
                conn.drain_events(timeout=left)
            except TimeoutError:
                pass


@app.task(name="rpc.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="rpc.fail")
def fail(text: str) -> None:
    raise ValueError(text)


@app.task(name="rpc.flaky", bind=True, max_retries=5)
def flaky(self: Any, times: int) -> int:
    """Retries `times` times (0.1 s apart), then returns how many retries it took."""
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
