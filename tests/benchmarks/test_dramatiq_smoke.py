"""A tiny run of the three-framework scenarios, so they do not rot: Dramatiq's worker next to
millpond's on real Redis, the memory-at-rest scenario and the raw latency floor.

It starts real `millpond worker` and `dramatiq` subprocesses and a bare redis-py consumer, and
reports through the real Redis side channel.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.timeout(120)]


def test_dramatiq_memory_and_raw_latency_are_measured(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--broker",
            "redis",
            "--pool",
            "solo",
            "--framework",
            "millpond,dramatiq",
            "--scenario",
            "drain,latency,memory,baseline",
            "--tasks",
            "30",
            "--latency-samples",
            "5",
            "--timeout",
            "20",
            "--grace",
            "5",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert out.exists(), f"no results file; harness output:\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, f"harness failed:\n{done.stdout}\n{done.stderr}"
    records = json.loads(out.read_text())["records"]
    by = {(r["scenario"], r["framework"]): r for r in records}
    for key in [
        ("drain", "dramatiq"),
        ("latency", "dramatiq"),
        ("memory", "dramatiq"),
        ("memory", "millpond"),
        ("latency", "raw"),
    ]:
        assert key in by, f"{key} not measured: {sorted(by)}"
        assert by[key]["ok"], by[key]
        assert by[key]["value"] > 0, by[key]
    drain = by[("drain", "dramatiq")]["metrics"]
    assert drain["n"] == 30
    assert drain["cpu_ms_per_task"] > 0
    assert drain["exit_code"] == 0, "the Dramatiq worker did not shut down warm on SIGTERM"
    memory = by[("memory", "dramatiq")]["metrics"]
    assert memory["rss_up_mib"] > 0 and memory["rss_after_mib"] > 0
    assert memory["processes"] == 2, "Dramatiq --processes 1 is a supervisor and one worker"
    assert by[("memory", "millpond")]["metrics"]["processes"] == 1
    assert by[("latency", "raw")]["metrics"]["samples"] == 5
    assert "### Three frameworks: no-op drain, CPU per task" in done.stdout
    assert "### Worker process tree RSS at rest" in done.stdout
