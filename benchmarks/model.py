"""What one benchmark run is and what it produced, shared by every part of the harness.

A run that goes wrong (a worker that exits, stalls or never starts) is a `RunFailed`, caught by the
scenario and turned into a failed `Record` with the worker's stderr tail: one broken plugin must
never stop the comparison of everything else, and the failure itself is the useful result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MILLPOND = "millpond"
CELERY = "celery"
DRAMATIQ = "dramatiq"
FRAMEWORKS = (MILLPOND, CELERY, DRAMATIQ)
#: the pools Dramatiq has an equivalent of (workers.dramatiq_command says which); no eventlet
DRAMATIQ_POOLS = frozenset({"solo", "threads", "prefork", "gevent"})

#: the pools compared, with the concurrency PERFORMANCE.md measures each at
DEFAULT_CONCURRENCY = {"solo": 1, "threads": 16, "prefork": 2, "gevent": 100, "eventlet": 100}


class RunFailed(Exception):
    """A run could not produce its figure; the message says what happened."""

    def __init__(self, message: str, *, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.detail = dict(detail or {})


@dataclass(frozen=True, slots=True)
class Combo:
    """One (broker, pool, concurrency) combination under test."""

    broker: str
    pool: str
    concurrency: int

    @property
    def label(self) -> str:
        return f"{self.pool} {self.concurrency}" if self.pool != "solo" else "solo"


@dataclass(slots=True)
class Record:
    """One measurement: a framework on a combination in a scenario, in one repeat.

    `value` is the headline figure (tasks/s, or the p50 in ms for latency); `metrics` holds the
    rest (p99, start-up time, peak RSS, enqueue rate...). A failed run has `ok=False`, an `error`
    and, when a worker was involved, the tail of its output.
    """

    scenario: str
    broker: str
    pool: str
    concurrency: int
    framework: str
    repeat: int
    ok: bool
    value: float | None = None
    unit: str = "tasks/s"
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    output_tail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        return cls(**data)
