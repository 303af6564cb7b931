"""The example app used by the README demo and the docs: a tiny shop's background jobs."""

from __future__ import annotations

import random
import time
from typing import Any

import structlog

from millpond import Millpond

app = Millpond("shop")
log = structlog.get_logger("shop")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(queue="celery")
def resize_image(name: str, width: int) -> str:
    """Pretend to do some I/O-bound work."""
    time.sleep(0.2 + random.random() * 0.3)
    log.info("image resized", image=name, width=width)
    return f"{name}@{width}px"


@app.task(bind=True, autoretry_for=(ConnectionError,), max_retries=3, retry_backoff=0.2)
def charge_card(self, order_id: str, amount: float) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Fails on its first attempt, the way a flaky payment API does, and is retried with backoff."""
    if self.request.retries == 0:
        log.warning("payment gateway timed out", order_id=order_id)
        raise ConnectionError("payment gateway timed out")
    return {"order_id": order_id, "charged": amount, "attempts": self.request.retries + 1}


@app.task
def refund(order_id: str) -> None:
    raise ValueError(f"order {order_id} was never charged")


@app.task
def order_total(prices: list[float]) -> float:
    """A chord's body: given every line's price, in order."""
    return round(sum(prices), 2)


@app.task
def price_line(sku: str, quantity: int) -> float:
    """One order line's price (a chord header task)."""
    return round(quantity * (1.5 + len(sku) / 10), 2)


@app.task
def notify(total: float) -> None:
    """A `link` callback: gets the linked task's result."""
    log.info("customer notified", total=total)


@app.task
def log_failure(request: Any, exc: BaseException, traceback: str | None) -> None:
    """A `link_error` errback taking (request, exc, traceback): called in the worker that saw the
    failure, right after it."""
    log.error("task failed", failed_task=request.id, error=repr(exc))


@app.task
def alert(task_id: str) -> None:
    """A `link_error` errback taking the failed task's id: sent as a task."""
    log.warning("someone should look at this", failed_task=task_id)
