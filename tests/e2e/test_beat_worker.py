"""`millpond worker -B`: the scheduler runs inside the worker, which also runs the ticks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from millpond.testing.harness import wait_until
from tests.e2e.harness import ROOT, lines_of

pytestmark = [pytest.mark.e2e]


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_worker_with_beat_runs_its_own_ticks(spawn_worker: Any, tmp_path: Path, pool: str) -> None:
    """The scheduler starts once the worker is ready (after a prefork pool forked)."""
    schedule = '{every-second = {task = "tests.e2e.app.count", schedule = 1}}'
    worker = spawn_worker(
        "-B", "-P", pool, "-c", "2", env={"MILLPOND_BEAT__SCHEDULE": schedule}
    ).wait_ready()
    wait_until(lambda: len(lines_of(tmp_path / "ran.log")) >= 3, 30, "three ticks run")
    published = [line for line in worker.lines() if line.get("event") == "beat published"]
    assert len(published) >= 3
    ran = set(lines_of(tmp_path / "ran.log"))
    assert {line["task_id"] for line in published[:3]} <= ran
    worker.signal(15)
    assert worker.wait(30) == 0
    assert any(line.get("event") == "beat stepped down" for line in worker.lines())


def test_worker_with_a_bad_schedule_does_not_start(spawn_worker: Any) -> None:
    schedule = '{broken = {task = "tests.e2e.app.count", schedule = "0 25 * * *"}}'
    worker = spawn_worker("-B", env={"MILLPOND_BEAT__SCHEDULE": schedule})
    assert worker.wait(30) == 2
    assert "beat schedule entry 'broken'" in worker.text()


def test_standalone_beat_exports_tick_counters(e2e_env: dict[str, str], tmp_path: Path) -> None:
    """`millpond beat` with OTEL_METRICS_EXPORTER=console: the counters reach the exporter,
    the last of them flushed as the process stops."""
    schedule = '{every-second = {task = "tests.e2e.app.count", schedule = 1}}'
    env = {
        **os.environ,
        **e2e_env,
        "MILLPOND_BEAT__SCHEDULE": schedule,
        "MILLPOND_LOG_FORMAT": "json",
        "OTEL_METRICS_EXPORTER": "console",
    }
    out = tmp_path / "beat.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "millpond", "beat", "-A", "tests.e2e.app:app"],
            cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_until(lambda: out.read_text().count('"beat published"') >= 2, 30, "two ticks")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    text = out.read_text()
    assert '"name": "millpond.beat.ticks.published"' in text, text[-3000:]
