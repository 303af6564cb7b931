"""The orders app's tests: millpond's pytest fixtures only, no conftest.py.

They pass on the memory broker (the default) and on any other one given with
`--millpond-broker URL`: the worker is real in both cases.
"""

from __future__ import annotations

import pytest
from orders import add, flaky, ledger, place_order

from millpond import Millpond, group
from millpond.testing.fixtures import RunningWorker


def test_a_task_runs_on_a_real_worker(millpond_app: Millpond, millpond_worker: RunningWorker):
    assert add.delay(2, 3).get(timeout=10) == 5


def test_eager_delay_returns_once_everything_has_run(millpond_eager: Millpond):
    result = place_order.delay("o-1", [2.5, 4.0])
    # nothing to wait for: the order and the notification it sent have both run
    assert f"notified o-1: {6.5:g}" in ledger
    assert result.get(timeout=1) == 6.5


def test_retries_run_before_an_eager_delay_returns(millpond_eager: Millpond):
    result = flaky.delay("k-1", 2)
    assert result.get(timeout=1) == "k-1 done after 2 retries"


def test_drain_waits_for_a_whole_group(
    millpond_app: Millpond, millpond_worker: RunningWorker, millpond_drain
):
    before = len(ledger)
    group(place_order.s(f"g-{i}", [float(i)]) for i in range(20)).apply_async()
    millpond_drain(timeout=20)
    placed = [line for line in ledger[before:] if line.startswith("placed g-")]
    notified = [line for line in ledger[before:] if line.startswith("notified g-")]
    assert len(placed) == 20
    assert len(notified) == 20


@pytest.mark.millpond_worker(pool="solo")
def test_the_pool_is_chosen_per_test(millpond_app: Millpond, millpond_worker: RunningWorker):
    assert millpond_worker.worker.settings.pool == "solo"
    assert add.delay(20, 22).get(timeout=10) == 42


def test_a_failure_comes_back_as_the_exception(
    millpond_app: Millpond, millpond_worker: RunningWorker
):
    with pytest.raises(ConnectionError, match="k-2: try again"):
        flaky.delay("k-2", 10).get(timeout=10)
