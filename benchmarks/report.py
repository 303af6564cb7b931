"""From records to markdown: medians per cell, millpond/Celery ratios, targets, failures.

Only ratios between runs of the same session mean anything on a shared machine (PERFORMANCE.md:
no-op runs spread about +-30 %), so every table puts millpond and Celery side by side from the same
invocation and the targets are checked against those same figures.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

from benchmarks.model import CELERY, DRAMATIQ, MILLPOND, Record

Key = tuple[str, str, int]  # broker, pool, concurrency

#: The targets, checked against the figures of the same run: issue 24's, and PERFORMANCE.md's
#: where they are stricter (the 3x-Celery rule on every no-op drain). Keyed by broker.
SOLO_DRAIN_TARGET = {"redis": 20000.0, "amqp": 15000.0}
SOLO_CPU_TARGET_MS = 0.040  # worker CPU per no-op task on solo
PREFORK_OF_SOLO = 0.70  # prefork 2 against millpond solo, no-op drains
PREFORK_OF_CELERY = 5.0  # prefork 2 against Celery prefork 2
ASYNCIO_OF_SOLO = 0.80  # asyncio 100 against millpond solo
LATENCY_P50_MS = 1.0
LATENCY_P99_MS = 2.5
SLEEP_TARGET = 9000.0  # 10 ms sleeps, gevent/eventlet 100 (bound 10,000)
STARTUP_TARGET_S = 0.2
RSS_TARGET_MIB = {"solo": 35.0, "prefork": 90.0}  # whole process tree, at rest after a drain
RATIO_TARGET = 3.0  # PERFORMANCE.md: every no-op drain at least 3x Celery's
TARGET_BROKERS = ("redis", "amqp")
BROKER_ORDER = {"sqlite": 0, "redis": 1, "amqp": 2, "postgres": 3}
POOL_ORDER = {"solo": 0, "threads": 1, "prefork": 2, "gevent": 3, "eventlet": 4, "asyncio": 5}


class Cell:
    """The runs of one framework in one table cell."""

    def __init__(self, records: list[Record]) -> None:
        self.records = records
        self.ok = [r for r in records if r.ok]

    def median(self, get: Callable[[Record], Any] = lambda r: r.value) -> float | None:
        values = [v for v in (get(r) for r in self.ok) if v is not None]
        return statistics.median(values) if values else None

    def show(self, value: float | None, fmt: str) -> str:
        if not self.records:
            return "-"
        if value is None:
            return "n/a" if self.ok else f"FAILED (0/{len(self.records)})"
        text = format(value, fmt)
        if len(self.ok) < len(self.records):
            text += f" ({len(self.ok)}/{len(self.records)} ok)"
        return text


def _group(records: Iterable[Record], scenario: str) -> dict[Key, dict[str, Cell]]:
    buckets: dict[Key, dict[str, list[Record]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.scenario == scenario:
            buckets[(r.broker, r.pool, r.concurrency)][r.framework].append(r)
    ordered = sorted(
        buckets, key=lambda k: (BROKER_ORDER.get(k[0], 9), k[0], POOL_ORDER.get(k[1], 9), k[2])
    )
    return {k: {fw: Cell(rs) for fw, rs in buckets[k].items()} for k in ordered}


def _pool(key: Key) -> str:
    return key[1] if key[1] == "solo" else f"{key[1]} {key[2]}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def _cells(group: dict[str, Cell]) -> tuple[Cell, Cell]:
    return group.get(MILLPOND, Cell([])), group.get(CELERY, Cell([]))


def _value_of(r: Record) -> Any:
    return r.value


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def drain_table(records: list[Record]) -> list[str]:
    rows = []
    for key, group in _group(records, "drain").items():
        m, c = _cells(group)
        mv, cv = m.median(), c.median()
        rows.append([key[0], _pool(key), m.show(mv, ",.0f"), c.show(cv, ",.0f"), _ratio(mv, cv)])
    return _table(["broker", "pool", "millpond tasks/s", "Celery tasks/s", "millpond/Celery"], rows)


def sleep_table(records: list[Record]) -> list[str]:
    """With the bound the concurrency allows (concurrency / sleep): near it, no pool can do 3x."""
    rows = []
    for key, group in _group(records, "sleep").items():
        m, c = _cells(group)
        mv, cv = m.median(), c.median()
        sleeps = [r.metrics.get("sleep_s") for cell in (m, c) for r in cell.records]
        sleep_s = next((s for s in sleeps if s), None)
        bound = key[2] / sleep_s if sleep_s else None
        share = f"{mv / bound:.0%}" if mv is not None and bound else "-"
        rows.append(
            [
                key[0],
                _pool(key),
                format(bound, ",.0f") if bound else "-",
                m.show(mv, ",.0f"),
                share,
                c.show(cv, ",.0f"),
                _ratio(mv, cv),
            ]
        )
    head = [
        "broker",
        "pool",
        "bound tasks/s",
        "millpond tasks/s",
        "millpond of bound",
        "Celery tasks/s",
        "millpond/Celery",
    ]
    return _table(head, rows)


def latency_table(records: list[Record]) -> list[str]:
    rows = []
    for key, group in _group(records, "latency").items():
        m, c = _cells(group)
        mv, cv = m.median(), c.median()
        mp99 = m.median(lambda r: r.metrics.get("p99_ms"))
        cp99 = c.median(lambda r: r.metrics.get("p99_ms"))
        rows.append(
            [
                key[0],
                _pool(key),
                m.show(mv, ".2f"),
                m.show(mp99, ".2f"),
                c.show(cv, ".2f"),
                c.show(cp99, ".2f"),
                _ratio(cv, mv),
            ]
        )
    head = [
        "broker",
        "pool",
        "millpond p50 ms",
        "millpond p99 ms",
        "Celery p50 ms",
        "Celery p99 ms",
        "Celery/millpond (p50)",
    ]
    return _table(head, rows)


def _metric_of(name: str, record: Record) -> Any:
    return record.metrics.get(name)


def _metric_table(records: list[Record], cols: list[tuple[str, str, str]]) -> list[str]:
    """A millpond and a Celery column per (metric, title, format), from the drain runs."""
    rows = []
    for key, group in _group(records, "drain").items():
        m, c = _cells(group)
        row = [key[0], _pool(key)]
        for metric, _title, fmt in cols:
            get = partial(_metric_of, metric)
            row.append(m.show(m.median(get), fmt))
            row.append(c.show(c.median(get), fmt))
        rows.append(row)
    head = ["broker", "pool"]
    for _metric, title, _fmt in cols:
        head += [f"millpond {title}", f"Celery {title}"]
    return _table(head, rows)


def lifecycle_table(records: list[Record]) -> list[str]:
    return _metric_table(
        records, [("startup_s", "start s", ".3f"), ("stop_s", "warm stop s", ".2f")]
    )


def memory_table(records: list[Record]) -> list[str]:
    return _metric_table(
        records, [("peak_rss_mib", "RSS MiB", ".1f"), ("peak_pss_mib", "PSS MiB", ".1f")]
    )


def baseline_table(records: list[Record]) -> list[str]:
    best_drain: dict[tuple[str, str], float] = {}
    for key, group in _group(records, "drain").items():
        for fw, cell in group.items():
            value = cell.median()
            if value is not None:
                best_drain[(key[0], fw)] = max(best_drain.get((key[0], fw), 0.0), value)
    cells: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in records:
        if r.scenario == "baseline":
            cells[(r.broker, r.framework)].append(r)
    rows = []
    for (broker, method), rs in sorted(cells.items(), key=lambda kv: BROKER_ORDER.get(kv[0][0], 9)):
        cell = Cell(rs)
        value = cell.median()
        rows.append(
            [
                broker,
                method,
                cell.show(value, ",.0f"),
                _ratio(best_drain.get((broker, MILLPOND)), value),
                _ratio(best_drain.get((broker, CELERY)), value),
            ]
        )
    head = [
        "broker",
        "no-framework loop",
        "tasks/s",
        "best millpond drain / it",
        "best Celery drain / it",
    ]
    return _table(head, rows)


class Targets:
    """Rows of the target table: what is wanted, what was measured, met or not, and the gap."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = []

    def check(
        self,
        what: str,
        measured: float | None,
        target: float,
        higher: bool,
        fmt: str,
        extra: str = "",
    ) -> None:
        sign = "≥" if higher else "≤"
        wanted = f"{sign} {target:{fmt}}"
        if measured is None:
            self.rows.append([what, wanted, "not measured", "-", "-"])
            return
        met = measured >= target if higher else measured <= target
        gap = measured - target
        share = f" ({gap / target:+.0%})" if target else ""
        self.rows.append(
            [
                what,
                wanted,
                format(measured, fmt) + extra,
                "yes" if met else "NO",
                f"{gap:+{fmt}}{share}",
            ]
        )

    def table(self) -> list[str]:
        return _table(["target", "wanted", "measured", "met", "gap"], self.rows)


def _millpond_median(
    groups: dict[Key, dict[str, Cell]],
    broker: str,
    pool: str,
    get: Callable[[Record], Any] = _value_of,
    framework: str = MILLPOND,
) -> float | None:
    """The median of one framework's runs of `pool` (any concurrency) on `broker`, or None."""
    for key, group in groups.items():
        if key[0] == broker and key[1] == pool and framework in group:
            return group[framework].median(get)
    return None


def _share(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets_table(records: list[Record]) -> list[str]:
    """Issue 24's targets (and PERFORMANCE.md's where stricter) against this run's figures.

    Every row says what is wanted, what was measured, whether it is met and by how much it is
    missed or beaten (measured - wanted, and that as a share of what is wanted). A row whose
    figure the selection did not measure says so instead of disappearing.
    """
    t = Targets()
    drains = _group(records, "drain")
    drain_brokers = sorted({k[0] for k in drains}, key=lambda b: BROKER_ORDER.get(b, 9))
    cpu = partial(_metric_of, "cpu_ms_per_task")
    for broker in drain_brokers:
        if broker not in TARGET_BROKERS:
            continue
        solo = _millpond_median(drains, broker, "solo")
        t.check(f"{broker} solo: no-op tasks/s", solo, SOLO_DRAIN_TARGET[broker], True, ",.0f")
        t.check(
            f"{broker} solo: worker CPU ms per no-op task",
            _millpond_median(drains, broker, "solo", cpu),
            SOLO_CPU_TARGET_MS,
            False,
            ".3f",
        )
        prefork = _millpond_median(drains, broker, "prefork")
        t.check(
            f"{broker} prefork: no-op drain / millpond solo",
            _share(prefork, solo),
            PREFORK_OF_SOLO,
            True,
            ".2f",
        )
        t.check(
            f"{broker} prefork: no-op drain / Celery prefork",
            _share(prefork, _millpond_median(drains, broker, "prefork", framework=CELERY)),
            PREFORK_OF_CELERY,
            True,
            ".2f",
        )
        t.check(
            f"{broker} asyncio: no-op drain / millpond solo",
            _share(_millpond_median(drains, broker, "asyncio"), solo),
            ASYNCIO_OF_SOLO,
            True,
            ".2f",
        )
    for key, group in _group(records, "latency").items():
        if MILLPOND not in group:
            continue
        cell = group[MILLPOND]
        where = f"{key[0]} {_pool(key)}"
        t.check(f"{where}: latency p50 (ms)", cell.median(), LATENCY_P50_MS, False, ".2f")
        t.check(
            f"{where}: latency p99 (ms)",
            cell.median(partial(_metric_of, "p99_ms")),
            LATENCY_P99_MS,
            False,
            ".2f",
        )
    for key, group in drains.items():
        if MILLPOND in group:
            t.check(
                f"{key[0]} {_pool(key)}: start to first task (s)",
                group[MILLPOND].median(partial(_metric_of, "startup_s")),
                STARTUP_TARGET_S,
                False,
                ".3f",
            )
    memory = _group(records, "memory")
    for key, group in (memory or drains).items():
        if key[1] not in RSS_TARGET_MIB or MILLPOND not in group:
            continue
        cell = group[MILLPOND]
        rss_name, pss_name = (
            ("rss_after_mib", "pss_after_mib") if memory else ("peak_rss_mib", "peak_pss_mib")
        )
        pss = cell.median(partial(_metric_of, pss_name))
        t.check(
            f"{key[0]} {_pool(key)}: RSS of the whole tree (MiB)",
            cell.median(partial(_metric_of, rss_name)),
            RSS_TARGET_MIB[key[1]],
            False,
            ".1f",
            f" (PSS {pss:.1f})" if pss is not None else "",
        )
    for key, group in _group(records, "sleep").items():
        if key[1] in ("gevent", "eventlet") and MILLPOND in group:
            t.check(
                f"{key[0]} {_pool(key)}: 10 ms sleeps (tasks/s)",
                group[MILLPOND].median(),
                SLEEP_TARGET * key[2] / 100,
                True,
                ",.0f",
            )
    for key, group in drains.items():  # PERFORMANCE.md: a no-op drain at least 3x Celery's
        m, c = _cells(group)
        if m.records and c.records:
            t.check(
                f"{key[0]} {_pool(key)}: no-op drain millpond/Celery",
                _share(m.median(), c.median()),
                RATIO_TARGET,
                True,
                ".2f",
            )
    return t.table()


def failures(records: list[Record], tail_lines: int = 12) -> list[str]:
    out: list[str] = []
    for r in records:
        if r.ok:
            continue
        where = (
            f"{r.scenario} / {r.broker} / {r.pool} {r.concurrency} / {r.framework} / "
            f"run {r.repeat + 1}"
        )
        extra = ", ".join(f"{k}={v}" for k, v in r.metrics.items())
        out.append(f"- **{where}**: {r.error}" + (f" ({extra})" if extra else ""))
        if r.output_tail:
            tail = "\n".join(r.output_tail.splitlines()[-tail_lines:])
            out += ["", "  ```", *("  " + line for line in tail.splitlines()), "  ```"]
    return out


THREE = ((MILLPOND, "millpond"), (CELERY, "Celery"), (DRAMATIQ, "Dramatiq"))


def _three(
    records: list[Record],
    scenario: str,
    cols: Sequence[tuple[Callable[[Record], Any], str, str]],
    ratio_of: Callable[[Record], Any],
    higher_better: bool,
    frameworks: tuple[tuple[str, str], ...] = THREE,
) -> list[str]:
    """One column per (metric, framework), then millpond against each of the other two.

    The ratios are of `ratio_of`, oriented so that above 1 means millpond is better.
    """
    rows = []
    for key, group in _group(records, scenario).items():
        row = [key[0], _pool(key)]
        for get, _title, fmt in cols:
            for fw, _name in frameworks:
                cell = group.get(fw, Cell([]))
                row.append(cell.show(cell.median(get), fmt))
        mine = group.get(MILLPOND, Cell([])).median(ratio_of)
        for fw in (CELERY, DRAMATIQ):
            other = group.get(fw, Cell([])).median(ratio_of)
            row.append(_ratio(mine, other) if higher_better else _ratio(other, mine))
        rows.append(row)
    head = ["broker", "pool"]
    for _get, title, _fmt in cols:
        head += [f"{name} {title}" for _fw, name in frameworks]
    head += (
        ["millpond/Celery", "millpond/Dramatiq"]
        if higher_better
        else ["Celery/millpond", "Dramatiq/millpond"]
    )
    return _table(head, rows)


def _value(r: Record) -> Any:
    return r.value


def _cpu(r: Record) -> Any:
    return r.metrics.get("cpu_ms_per_task")


def three_drain_table(records: list[Record]) -> list[str]:
    cols = [(_value, "tasks/s", ",.0f"), (_cpu, "CPU ms/task", ".3f")]
    return _three(records, "drain", cols, _value, True)


def three_sleep_table(records: list[Record]) -> list[str]:
    cols = [(_value, "tasks/s", ",.0f"), (_cpu, "CPU ms/task", ".3f")]
    return _three(records, "sleep", cols, _value, True)


def three_latency_table(records: list[Record]) -> list[str]:
    cols: list[tuple[Callable[[Record], Any], str, str]] = [
        (_value, "p50 ms", ".2f"),
        (partial(_metric_of, "p99_ms"), "p99 ms", ".2f"),
    ]
    frameworks = (*THREE, ("raw", "no-framework"))
    return _three(records, "latency", cols, _value, False, frameworks)


def three_memory_table(records: list[Record]) -> list[str]:
    cols = [
        (partial(_metric_of, "rss_up_mib"), "RSS up MiB", ".1f"),
        (partial(_metric_of, "rss_after_mib"), "RSS after MiB", ".1f"),
        (partial(_metric_of, "pss_after_mib"), "PSS after MiB", ".1f"),
        (partial(_metric_of, "processes"), "processes", ".0f"),
    ]
    return _three(records, "memory", cols, partial(_metric_of, "rss_after_mib"), False)


def render(records: list[Record], meta: dict[str, Any]) -> str:
    """The whole report as markdown (what `run.py` prints and what docs/benchmarks.md quotes)."""
    runs = meta.get("repeats", 1)
    parts: list[str] = [f"Medians of {runs} interleaved run(s); ratios from the same session."]
    sections = [
        (f"No-op drain ({meta.get('tasks', '?')} tasks)", "drain", drain_table),
        ("Idle-worker latency (send to task start)", "latency", latency_table),
        (f"10 ms sleep tasks ({meta.get('sleep_tasks', '?')})", "sleep", sleep_table),
        (
            "Popen to the first task's start, and SIGTERM to exit (drain runs)",
            "drain",
            lifecycle_table,
        ),
        ("Peak memory of the worker's process tree (drain runs)", "drain", memory_table),
        (f"No-framework floors ({meta.get('tasks', '?')} messages)", "baseline", baseline_table),
    ]
    if any(r.framework == DRAMATIQ for r in records):
        sections += [
            ("Three frameworks: no-op drain, CPU per task", "drain", three_drain_table),
            ("Three frameworks: 10 ms sleep tasks", "sleep", three_sleep_table),
            ("Three frameworks: idle-worker latency", "latency", three_latency_table),
        ]
    sections.append(
        (
            f"Worker process tree RSS at rest: up, and after {meta.get('tasks', '?')} no-ops",
            "memory",
            three_memory_table,
        )
    )
    for title, scenario, make in sections:
        if any(r.scenario == scenario for r in records):
            parts += ["", f"### {title}", "", *make(records)]
    if any(r.framework == MILLPOND for r in records):
        parts += ["", "### Against the targets", "", *targets_table(records)]
    failed = failures(records)
    if failed:
        parts += ["", "### Failures", "", *failed]
    return "\n".join(parts) + "\n"
