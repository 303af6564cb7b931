"""A tiny run of the tracing benchmark, so it does not rot: Redis, solo, every configuration.

Real `millpond worker` subprocesses, the sink process, the Redis side channel; the benchmark
itself checks one span per task from the right exporter, so a pass means the counts held.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.timeout(120)]


def test_every_configuration_drains_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "tracing.json"
    done = subprocess.run(
        [
            sys.executable, str(ROOT / "benchmarks" / "tracing_overhead.py"),
            "--broker", "redis", "--pool", "solo", "--tasks", "200", "--rounds", "1",
            "--configs", "untraced,spans,otlp,fast", "--timeout", "30", "--out", str(out),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    data = json.loads(out.read_text())
    drains = {d["config"]: d for d in data["drains"]}
    assert set(drains) == {"untraced", "spans", "otlp", "fast"}
    for drain in drains.values():
        assert drain["ok"], drain
        assert drain["rate"] > 0
        assert drain["cpu_us"] > 0
    assert drains["untraced"]["spans"] == 0
    assert drains["otlp"]["spans"] == drains["fast"]["spans"] == 202
    assert "| Redis | solo | SDK spans, millpond-otlp exporter |" in done.stdout
    report = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tracing_overhead.py"), "--report", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert "+CPU µs/task" in report.stdout
