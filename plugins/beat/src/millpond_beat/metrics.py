"""Tick counters on the OpenTelemetry metrics API: published, missed and late ticks per entry.

The instruments are made on whatever meter provider is installed (millpond-metrics installs one in
a worker; `millpond beat` installs it too when OTEL_METRICS_EXPORTER asks for one), so without a
provider they cost nothing and export nothing.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import metrics as otel_metrics

SCOPE = "millpond.beat"
ENTRY = "millpond.beat.entry"


class BeatMetrics:
    def __init__(self, provider: Any = None) -> None:
        meter = (provider or otel_metrics.get_meter_provider()).get_meter(SCOPE)
        self._published = meter.create_counter(
            "millpond.beat.ticks.published", unit="{tick}", description="Ticks published"
        )
        self._missed = meter.create_counter(
            "millpond.beat.ticks.missed",
            unit="{tick}",
            description="Ticks nobody published (no leader at the time, catch_up, a refused publish)",
        )
        self._late = meter.create_counter(
            "millpond.beat.ticks.late",
            unit="{tick}",
            description="Ticks published more than beat.late_after seconds after their time",
        )

    def published(self, entry: str) -> None:
        self._published.add(1, {ENTRY: entry})

    def missed(self, entry: str, count: int) -> None:
        self._missed.add(count, {ENTRY: entry})

    def late(self, entry: str) -> None:
        self._late.add(1, {ENTRY: entry})
