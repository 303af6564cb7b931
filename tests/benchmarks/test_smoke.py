"""A tiny run of the benchmark harness, so it does not rot: sqlite broker, solo pool, millpond only.

It starts real `millpond worker` subprocesses and reports through the real Redis side channel.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.timeout(60)]


def bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--broker",
            "sqlite",
            "--framework",
            "millpond",
            "--timeout",
            "15",
            "--grace",
            "5",
            "--out",
            str(out),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert out.exists(), f"no results file; harness output:\n{done.stdout}\n{done.stderr}"
    return done, json.loads(out.read_text())


def test_quick_run_measures_drain_latency_and_floor(tmp_path: Path) -> None:
    done, data = bench(
        tmp_path,
        "--pool",
        "solo",
        "--tasks",
        "50",
        "--latency-samples",
        "5",
        "--scenario",
        "drain,latency,baseline",
    )
    assert done.returncode == 0, f"harness failed:\n{done.stdout}\n{done.stderr}"
    records = {r["scenario"]: r for r in data["records"]}
    assert set(records) == {"drain", "latency", "baseline"}, data["records"]
    for record in records.values():
        assert record["ok"], record
        assert record["value"] > 0, record
    drain = records["drain"]["metrics"]
    assert drain["n"] == 50
    assert drain["startup_s"] > 0
    assert drain["peak_rss_mib"] > 0
    assert drain["exit_code"] == 0, "the worker did not shut down warm on SIGTERM"
    assert records["latency"]["metrics"]["samples"] == 5
    assert "| sqlite | solo |" in done.stdout
    assert "### Against the targets" in done.stdout


def test_a_failing_combination_is_recorded_not_fatal(tmp_path: Path) -> None:
    done, data = bench(
        tmp_path,
        "--pool",
        "no-such-pool:1",
        "--tasks",
        "5",
        "--latency-samples",
        "0",
        "--scenario",
        "drain",
    )
    assert done.returncode == 1, f"expected exit 1 for a failed run:\n{done.stdout}\n{done.stderr}"
    [record] = data["records"]
    assert not record["ok"]
    assert "exited with code 2" in record["error"]
    assert record["metrics"]["left_in_queue"] == 7  # start mark, 5 no-ops, end mark
    assert "no-such-pool" in record["output_tail"]
    assert "### Failures" in done.stdout
