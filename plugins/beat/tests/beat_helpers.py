"""Helpers for the beat tests: a hook that records every tick the producer path publishes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from millpond.contracts.hooks import Hooks, Publication
from millpond_beat.scheduler import TICK_HEADER


@dataclass
class Published:
    entry: str
    tick: float
    task: str
    queue: str
    headers: dict[str, Any]


@dataclass
class TickRecorder(Hooks):
    """Every message published through `Millpond.publish` that a scheduler marked as a tick."""

    ticks: list[Published] = field(default_factory=list)

    def before_publish(self, publication: Publication) -> Any:
        headers = publication.message.headers
        if TICK_HEADER in headers:
            self.ticks.append(
                Published(
                    str(headers["periodic_task_name"]),
                    float(headers[TICK_HEADER]),
                    publication.task_name,
                    publication.queue,
                    dict(headers),
                )
            )
        return None

    def of(self, entry: str) -> list[float]:
        return [t.tick for t in self.ticks if t.entry == entry]
