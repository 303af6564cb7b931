"""A small app whose tests (tests/test_orders.py) use only millpond's pytest fixtures.

    cd examples/testing && python -m pytest                                   # memory broker
    cd examples/testing && python -m pytest --millpond-broker redis://127.0.0.1:6379/0

`pytest.ini` names the app (`millpond_app = orders:app`); the fixtures point it at the broker under
test and at a queue of each test's own.
"""

from __future__ import annotations

from millpond import Millpond

app = Millpond("orders")

#: what the tasks did, in order: the tests read it (the worker runs in the test's process)
ledger: list[str] = []
#: failures left per key for `flaky`
_failures: dict[str, int] = {}


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def place_order(order_id: str, prices: list[float]) -> float:
    """Totals an order and sends a notification task of its own."""
    total = sum(prices)
    ledger.append(f"placed {order_id}")
    notify.delay(order_id, total)
    return total


@app.task
def notify(order_id: str, total: float) -> None:
    ledger.append(f"notified {order_id}: {total:g}")


@app.task(bind=True, max_retries=5)
def flaky(self, key: str, fail_times: int) -> str:  # type: ignore[no-untyped-def]
    """Fails `fail_times` times for `key`, retrying at once each time, then succeeds."""
    left = _failures.setdefault(key, fail_times)
    if left > 0:
        _failures[key] = left - 1
        raise self.retry(countdown=0, exc=ConnectionError(f"{key}: try again"))
    return f"{key} done after {self.request.retries} retries"
