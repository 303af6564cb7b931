"""The target table of the benchmark report: issue 24's targets, met or not, and by how much.

Built from records like the harness writes; no servers needed, the table is pure arithmetic.
"""

from __future__ import annotations

from typing import Any

from benchmarks.model import CELERY, MILLPOND, Record
from benchmarks.report import render, targets_table


def rec(
    scenario: str, broker: str, pool: str, conc: int, fw: str, value: float, **m: Any
) -> Record:
    return Record(scenario, broker, pool, conc, fw, 0, True, value, metrics=m)


def rows(records: list[Record]) -> dict[str, list[str]]:
    out = {}
    for line in targets_table(records)[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = cells[1:]
    return out


def test_each_target_says_wanted_measured_met_and_gap() -> None:
    records = [
        rec("drain", "redis", "solo", 1, MILLPOND, 10000.0, cpu_ms_per_task=0.063, startup_s=0.3),
        rec("drain", "redis", "prefork", 2, MILLPOND, 7500.0, cpu_ms_per_task=0.1, startup_s=0.1),
        rec("drain", "redis", "prefork", 2, CELERY, 1000.0, startup_s=1.0),
        rec("drain", "redis", "asyncio", 100, MILLPOND, 5000.0, startup_s=0.15),
        rec("latency", "redis", "solo", 1, MILLPOND, 0.8, p99_ms=3.0),
        rec("sleep", "redis", "gevent", 100, MILLPOND, 9500.0),
        rec("memory", "redis", "solo", 1, MILLPOND, 46.0, rss_after_mib=46.0, pss_after_mib=40.0),
    ]
    got = rows(records)
    assert got["redis solo: no-op tasks/s"] == ["≥ 20,000", "10,000", "NO", "-10,000 (-50%)"]
    assert got["redis solo: worker CPU ms per no-op task"][2] == "NO"
    assert got["redis prefork: no-op drain / millpond solo"][1:3] == ["0.75", "yes"]
    assert got["redis prefork: no-op drain / Celery prefork"][1:3] == ["7.50", "yes"]
    assert got["redis asyncio: no-op drain / millpond solo"][1:3] == ["0.50", "NO"]
    assert got["redis solo: latency p50 (ms)"][2] == "yes"
    assert got["redis solo: latency p99 (ms)"][1:] == ["3.00", "NO", "+0.50 (+20%)"]
    assert got["redis gevent 100: 10 ms sleeps (tasks/s)"][2] == "yes"
    assert got["redis solo: RSS of the whole tree (MiB)"][1:3] == ["46.0 (PSS 40.0)", "NO"]
    assert got["redis solo: start to first task (s)"][2] == "NO"
    assert got["redis asyncio 100: start to first task (s)"][2] == "yes"
    assert got["redis prefork 2: no-op drain millpond/Celery"][1:3] == ["7.50", "yes"]
    assert "### Against the targets" in render(records, {"repeats": 1})


def test_a_target_the_run_did_not_measure_says_so() -> None:
    got = rows([rec("drain", "amqp", "solo", 1, MILLPOND, 16000.0, startup_s=0.1)])
    assert got["amqp solo: no-op tasks/s"][2] == "yes"
    assert got["amqp prefork: no-op drain / millpond solo"][1:] == ["not measured", "-", "-"]
