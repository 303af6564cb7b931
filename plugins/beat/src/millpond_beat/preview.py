"""What a schedule will do, without running anything: the ticks of every entry between two times.

    >>> from millpond_beat.preview import preview
    >>> for when, name in preview(app, start, end): print(when.isoformat(), name)

It builds and checks the entries exactly as `millpond beat` does (code and settings), so it is also
the quickest way to test a schedule, DST changes included, in a unit test.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from millpond_beat import entries as entries_mod

if TYPE_CHECKING:
    from millpond.produce.app import Millpond


def preview(
    app: Millpond,
    start: datetime,
    end: datetime,
    *,
    schedule: Mapping[str, Any] | None = None,
    limit: int = 1_000_000,
) -> list[tuple[datetime, str]]:
    """(tick, entry name) for every tick after `start` and before `end`, in order; each tick is
    an aware datetime in its entry's time zone. `schedule` is a `[beat] schedule` table (the
    app's settings' table when None)."""
    if schedule is None:
        from millpond_beat.command import build_entries

        found = build_entries(app, app.settings)
    else:
        values = app.settings.section(_section())
        found = entries_mod.build(
            app,
            schedule,
            timezone=values["timezone"],
            catch_up=values["catch_up"],
            check_tasks=values["check_tasks"],
        )
    since, until = _instant(start), _instant(end)
    heap: list[tuple[float, str]] = []
    for name, entry in found.items():
        tick = entry.next_after(since)
        if tick is not None and tick < until:
            heap.append((tick, name))
    heapq.heapify(heap)
    out: list[tuple[datetime, str]] = []
    while heap and len(out) < limit:
        tick, name = heapq.heappop(heap)
        entry = found[name]
        out.append((datetime.fromtimestamp(tick, entry.tz), name))
        following = entry.next_after(tick)
        if following is not None and following < until:
            heapq.heappush(heap, (following, name))
    return out


def _instant(when: datetime) -> float:
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _section() -> Any:
    from millpond_beat.settings import SECTION

    return SECTION
