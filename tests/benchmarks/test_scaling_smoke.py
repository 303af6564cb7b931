"""A tiny run of the scaling benchmark, so it does not rot: both sweeps on real Redis.

It starts real `millpond worker` subprocesses (one per point of the pools sweep, several at once
for the workers sweep), reports through the real Redis side channel, and checks that the plot and
the JSON are written and hold figures that make sense.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.timeout(90)]


def test_scaling_writes_a_plausible_png_and_json(tmp_path: Path) -> None:
    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "scaling.py"),
            "--quick",
            "--pools",
            "threads,asyncio",
            "--concurrency",
            "1,10",
            "--workers",
            "1,2",
            "--tasks",
            "40",
            "--sleep-tasks",
            "30",
            "--latency-samples",
            "3",
            "--timeout",
            "20",
            "--grace",
            "5",
            "--out",
            str(out),
            "--png",
            str(png),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert out.exists(), f"no results file; output:\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, f"scaling failed:\n{done.stdout}\n{done.stderr}"
    points = json.loads(out.read_text())["points"]
    seen = {(p["sweep"], p["pool"], p["x"]) for p in points}
    assert seen == {
        ("pools", "threads", 1),
        ("pools", "threads", 10),
        ("pools", "asyncio", 1),
        ("pools", "asyncio", 10),
        ("workers", "solo", 1),
        ("workers", "solo", 2),
    }
    for p in points:
        assert p["ok"], p
        assert p["noop_tps"] > 0 and p["cpu_ms_per_task"] >= 0, p  # CPU is read in 10 ms ticks
        # a 10 ms sleep cannot beat concurrency / 10 ms (a little slack for clock jitter)
        assert 0 < p["sleep_tps"] <= p["sleep_bound"] * 1.2, p
        assert 0 < p["p50_ms"] <= p["p99_ms"], p
    # ten at once sleep faster than one at a time, whatever the machine's load
    by = {(p["pool"], p["x"]): p for p in points}
    assert by[("threads", 10)]["sleep_tps"] > 2 * by[("threads", 1)]["sleep_tps"]
    assert by[("asyncio", 10)]["sleep_tps"] > 2 * by[("asyncio", 1)]["sleep_tps"]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, "not a real plot"
    assert "| workers | solo | 2 |" in done.stdout
