"""The CI-sized load run: 5,000 tasks drained by three workers at once (prefork, threads, gevent)
on one queue, through the same code as `benchmarks/load_all.py` (100,000 tasks, not in CI)."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmarks.load_all import URLS, describe, run

from tests.faults.conftest import BROKERS

pytestmark = [pytest.mark.fault, pytest.mark.e2e]


@pytest.mark.parametrize("broker", BROKERS)
def test_three_workers_share_5000_tasks_and_account_for_each(broker: str, tmp_path: Path) -> None:
    result = run(URLS[broker], 5000, tmp_path, timeout=120)
    print(describe(result))
    assert result["lost"] == 0
    if result["duplicated"]:
        # allowed only if the shared RabbitMQ was restarted under us (another test does that)
        logs = "".join(log.read_text() for log in tmp_path.glob("*.log"))
        assert "lost the consumer connection" in logs, "without faults every task runs once"
        print("duplicates allowed: a worker lost its broker connection during the run")
    workers = result["workers"]
    assert all(w["exit"] == 0 for w in workers.values()), workers
    assert sum(w["processed"] for w in workers.values()) == 5000 + result["extra_runs"], workers
    assert all(w["processed"] > 0 for w in workers.values()), "a worker got no work"
