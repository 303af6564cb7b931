"""Schedule sources (`beat.source`): their entries join code and settings, a changed version makes
beat read them again (and only then), an unreadable source keeps the running schedule, and a
published tick is reported back to the source."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import pytest

from millpond import Millpond
from millpond.exceptions import ConfigurationError
from millpond_beat.clock import FakeClock
from millpond_beat.command import SettingsWatch, build_entries
from millpond_beat.scheduler import Beat, BeatConfig
from millpond_beat.sources import ScheduleSource, load_source


class TableSource(ScheduleSource):
    """A source over a dict the test edits; counts how often it is read."""

    label = "table"

    def __init__(self, app: Millpond) -> None:
        super().__init__(app)
        self.table: dict[str, dict[str, Any]] = {}
        self.counter = 0
        self.reads = 0
        self.broken = False
        self.ran: list[tuple[str, float]] = []

    def version(self) -> Hashable:
        if self.broken:
            raise OSError("database is down")
        return self.counter

    def schedule(self) -> Mapping[str, Mapping[str, Any]]:
        self.reads += 1
        return dict(self.table)

    def published(self, name: str, tick: float) -> None:
        self.ran.append((name, tick))


@pytest.fixture
def source(memory_app: Millpond) -> TableSource:
    memory_app.task(name="ping")(lambda: None)
    return TableSource(memory_app)


def test_source_entries_join_and_reload_only_when_the_version_moves(
    memory_app: Millpond, source: TableSource
) -> None:
    source.table["db-ping"] = {"task": "ping", "schedule": 10}
    entries = build_entries(memory_app, memory_app.settings, source)
    assert entries["db-ping"].source == "table"
    watch = SettingsWatch(memory_app, {}, source)
    reads = source.reads
    assert watch() is None and source.reads == reads, "an unchanged version reads nothing"
    source.table["db-pong"] = {"task": "ping", "schedule": "*/5 * * * *"}
    source.counter += 1
    fresh = watch()
    assert fresh is not None and set(fresh) == {"db-ping", "db-pong"}
    source.broken = True
    assert watch() is None, "an unreadable source keeps the running schedule"


def test_a_change_read_while_the_source_fails_is_read_again_once_it_answers(
    memory_app: Millpond, source: TableSource
) -> None:
    # the version moved, then reading the schedule failed (the database went down in between):
    # the running schedule is kept, and the change is read at the next look, not lost for good
    source.table["db-ping"] = {"task": "ping", "schedule": 10}
    watch = SettingsWatch(memory_app, {}, source)
    source.table["db-pong"] = {"task": "ping", "schedule": 5}
    source.counter += 1
    read = source.schedule

    def down() -> Mapping[str, Mapping[str, Any]]:
        raise OSError("database is down")

    source.schedule = down  # type: ignore[method-assign]
    assert watch() is None, "an unreadable source keeps the running schedule"
    source.schedule = read  # type: ignore[method-assign]
    fresh = watch()
    assert fresh is not None and set(fresh) == {"db-ping", "db-pong"}


def test_a_bad_or_clashing_source_entry_is_refused_naming_it(
    memory_app: Millpond, source: TableSource
) -> None:
    source.table["bad"] = {"task": "ping", "schedule": "61 * * * *"}
    with pytest.raises(ConfigurationError, match=r"'bad' \(table\)"):
        build_entries(memory_app, memory_app.settings, source)
    memory_app.periodic_task(10, name="clash")(lambda: None)
    source.table = {"clash": {"task": "ping", "schedule": 10}}
    with pytest.raises(ConfigurationError, match="rename one of them"):
        build_entries(memory_app, memory_app.settings, source)


def test_an_unknown_source_is_a_clear_error(memory_app: Millpond) -> None:
    with pytest.raises(ConfigurationError, match="no beat schedule source of that name"):
        load_source("no-such-source", memory_app)


def test_published_ticks_are_reported_to_the_source(
    memory_app: Millpond, source: TableSource
) -> None:
    source.table["db-ping"] = {"task": "ping", "schedule": 10}
    entries = build_entries(memory_app, memory_app.settings, source)
    clock = FakeClock(1_000_000.0)
    beat = Beat(
        memory_app,
        entries,
        memory_app.broker.claims(),
        BeatConfig(),
        clock=clock,
        published=source.published,
    )
    beat.step()
    clock.advance(25)
    beat.step()
    assert [name for name, _ in source.ran] and {n for n, _ in source.ran} == {"db-ping"}
    assert all(tick % 10 == 0 for _, tick in source.ran)
