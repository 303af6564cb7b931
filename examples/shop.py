"""The example app used by the README demo and the docs: a tiny shop's background jobs."""

from __future__ import annotations

import random
import time

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
