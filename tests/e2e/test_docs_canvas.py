"""docs/canvas.md runs as written: every Python block, in order, against a `millpond worker` of
the example shop on a fresh embedded broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.docs_runner import DOCS, clean_env, guide_worker, run_guide

pytestmark = pytest.mark.e2e


def test_every_python_block_of_the_canvas_guide_runs(tmp_path: Path) -> None:
    env = clean_env(MILLPOND_BROKER_URL=f"sqlite://{tmp_path / 'broker.db'}")
    args = ["-A", "examples.shop:app", "-P", "threads"]
    with guide_worker(args, env, tmp_path / "worker.log") as log:
        run_guide(DOCS / "canvas.md", env, worker_log=log)
    assert "chord complete; sending its body" in log.read_text()
