"""A tiny run of the rate-limit benchmark, so it does not rot: Redis, millpond only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.timeout(90)]


def test_the_rate_limit_benchmark_measures_a_flood() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "rate_limits.py"), "--framework", "millpond",
         "--limited", "10", "--free", "50", "--repeats", "1", "--timeout", "40"],
        cwd=ROOT, capture_output=True, text=True, timeout=80, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    table = {
        line.split("|")[1].strip(): float(line.split("|")[2].replace(",", ""))
        for line in done.stdout.splitlines()
        if line.startswith(("| limited", "| free"))
    }
    assert table["limited_duplicates"] == 0
    assert table["limited_max_in_1s"] <= 21
    assert table["free_done_s"] < 5.0
