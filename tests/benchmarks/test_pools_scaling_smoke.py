"""A tiny run of the pools benchmark, so it does not rot: real threads and prefork pools, no broker.

It runs benchmarks/pools_scaling.py as a script (prefork forks its children from it) with a few
tasks per scenario and checks that every row is printed with figures that make sense.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.timeout(90)]

ROW = re.compile(
    r"^(?P<kind>cpu|io|overhead)\s+(?P<pool>(?:prefork|threads) -c \d+)\s+(?P<tasks>\d+)\s+"
    r"(?P<seconds>[\d.]+)\s+(?P<rate>[\d.]+)\s+(?P<note>.+)$"
)


def test_every_scenario_runs_and_reports() -> None:
    done = subprocess.run(
        [
            sys.executable, str(ROOT / "benchmarks" / "pools_scaling.py"),
            "--rounds", "1", "--cpu-tasks", "2", "--io-tasks", "32", "--noop-tasks", "50",
            "--timeout", "30",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=80, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    rows = {
        (m["kind"], m["pool"]): m for m in map(ROW.match, done.stdout.splitlines()) if m is not None
    }
    assert set(rows) == {
        ("cpu", "prefork -c 1"),
        ("cpu", "prefork -c 2"),
        ("cpu", "threads -c 2"),
        ("io", "threads -c 1"),
        ("io", "threads -c 4"),
        ("io", "threads -c 16"),
        ("overhead", "threads -c 4"),
        ("overhead", "prefork -c 2"),
    }, done.stdout
    expected_tasks = {"cpu": 2, "io": 32, "overhead": 50}
    for (kind, _pool), row in rows.items():
        assert int(row["tasks"]) == expected_tasks[kind], row.string
        assert float(row["rate"]) > 0, row.string
    assert rows[("overhead", "prefork -c 2")]["note"].endswith("us per task")
    # 32 sleeps of 10 ms: one thread needs 0.32 s at least, sixteen overlap them, whatever the load
    io_one, io_sixteen = (float(rows[("io", p)]["rate"]) for p in ("threads -c 1", "threads -c 16"))
    assert io_sixteen > 2 * io_one, done.stdout
    assert io_one <= 100 * 1.2, done.stdout  # a 10 ms sleep cannot beat 100 a second on one thread
    assert re.search(r"^ceiling: .* took [\d.]+ / [\d.]+ s", done.stdout, re.M), done.stdout
