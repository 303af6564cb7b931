"""docs/postgres.md runs as written: every Python block, in order, in a fresh interpreter, against
a `millpond worker` of the example shop on the session's private PostgreSQL."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from tests.e2e.docs_runner import DOCS, clean_env, run_guide
from tests.e2e.harness import ROOT

from millpond.testing.harness import WorkerProcess

pytestmark = pytest.mark.e2e


def test_every_python_block_of_the_postgres_guide_runs(tmp_path: Path, postgres_url: str) -> None:
    env = clean_env(MILLPOND_BROKER_URL=postgres_url)
    worker = WorkerProcess(["-A", "examples.shop:app", "-P", "threads"], env, tmp_path, cwd=ROOT)
    try:
        worker.wait_ready()
        printed = run_guide(DOCS / "postgres.md", env, worker_log=worker.stderr_path)
        assert "ready:" in printed
    finally:
        worker.signal(signal.SIGTERM)
        worker.wait(30)
