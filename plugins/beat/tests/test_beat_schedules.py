"""Schedules on their own: parsing, intervals, crontab wall-clock rules, Celery's objects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from millpond_beat import ScheduleError, at, crontab, every
from millpond_beat.schedules import parse, zone

BERLIN = ZoneInfo("Europe/Berlin")


def ts(*args: int, tz: object = UTC) -> float:
    return datetime(*args, tzinfo=tz).timestamp()  # type: ignore[arg-type]


def walk(schedule: object, start: float, n: int, tz: object = UTC) -> list[float]:
    out, t = [], start
    for _ in range(n):
        t = schedule.next_after(t, tz)  # type: ignore[attr-defined]
        out.append(t)
    return out


def test_every_ticks_on_whole_multiples_of_its_period() -> None:
    assert walk(every(60), ts(2026, 1, 1, 10, 0, 30), 3) == [
        ts(2026, 1, 1, 10, 1),
        ts(2026, 1, 1, 10, 2),
        ts(2026, 1, 1, 10, 3),
    ]
    # exactly on a tick: the next one
    assert every(1).next_after(100.0, UTC) == 101.0
    assert every(10, anchor=3).next_after(20.0, UTC) == 23.0


def test_every_counts_what_a_scheduler_away_missed() -> None:
    assert every(1).due_between(10.5, 15.0, UTC) == (15.0, 5)
    assert every(1).due_between(10.0, 10.9, UTC) == (None, 0)


def test_crontab_string_and_fields_mean_the_same() -> None:
    assert crontab("*/15 9-17 * * mon-fri") == crontab(
        minute="*/15", hour="9-17", day_of_week="mon-fri"
    )
    c = crontab("0 7 * * 1-5")
    # 2026-01-03 is a Saturday: next is Monday 07:00
    assert c.next_after(ts(2026, 1, 2, 8), UTC) == ts(2026, 1, 5, 7)


def test_crontab_sunday_is_0_and_7() -> None:
    assert crontab("0 0 * * 0").day_of_week == crontab("0 0 * * 7").day_of_week == {0}
    assert crontab("0 0 * * 5-7").day_of_week == {5, 6, 0}


def test_crontab_takes_full_day_and_month_names_as_celery_does() -> None:
    weekdays = crontab(day_of_week="monday-friday")
    assert weekdays.day_of_week == crontab(day_of_week="mon-fri").day_of_week == {1, 2, 3, 4, 5}
    named, short = crontab("0 7 * January,march Sunday"), crontab("0 7 * jan,mar sun")
    assert (named.month_of_year, named.day_of_week) == (short.month_of_year, short.day_of_week)
    with pytest.raises(ScheduleError, match="'monkey' is not a number or a known name"):
        crontab(day_of_week="monkey")


def test_crontab_day_of_month_and_month() -> None:
    c = crontab("0 12 29 2 *")  # leap days only
    assert c.next_after(ts(2026, 1, 1), UTC) == ts(2028, 2, 29, 12)
    # both day fields restricted: both must match, as in Celery (2026-03-13 is a Friday)
    friday_13th = crontab(minute=0, hour=0, day_of_month=13, day_of_week="fri")
    assert friday_13th.next_after(ts(2026, 1, 1), UTC) == ts(2026, 2, 13)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("61 * * * *", "minute"),
        ("* 24 * * *", "hour"),
        ("* * 0 * *", "day_of_month"),
        ("* * * 13 *", "month_of_year"),
        ("* * * * funday", "day_of_week"),
        ("5-1 * * * *", "backwards"),
        ("* * * *", "five fields"),
        ("0 0 31 2 *", "no month"),
        ("*/0 * * * *", "minute"),
    ],
)
def test_bad_crontabs_say_what_is_wrong(spec: str, words: str) -> None:
    with pytest.raises(ScheduleError, match=words):
        crontab(spec)


def test_parse_reads_every_form_people_write() -> None:
    assert parse(30) == every(30)
    assert parse(timedelta(minutes=5)) == every(300)
    assert parse("2.5") == every(2.5)
    assert parse("*/5 * * * *") == crontab(minute="*/5")
    assert parse({"minute": 30, "hour": "2"}) == crontab("30 2 * * *")
    assert parse({"every": 10}) == every(10)
    when = datetime(2030, 1, 1, tzinfo=UTC)
    assert parse({"at": "2030-01-01T00:00:00+00:00"}) == at(when)
    with pytest.raises(ScheduleError, match="cannot read the schedule"):
        parse([1, 2])
    with pytest.raises(ScheduleError, match="more than 0"):
        parse(0)


def test_at_ticks_once() -> None:
    when = ts(2030, 1, 1)
    assert at(when).next_after(when - 1, UTC) == when
    assert at(when).next_after(when, UTC) is None
    # a naive time is read in the entry's zone
    naive = at(datetime(2030, 1, 1, 12))
    assert naive.next_after(0, BERLIN) == ts(2030, 1, 1, 11)


def test_bad_time_zone_is_refused() -> None:
    with pytest.raises(ScheduleError, match="unknown time zone 'Mars/Olympus'"):
        zone("Mars/Olympus")


def test_celery_schedule_objects_are_read() -> None:
    from celery.schedules import crontab as celery_crontab
    from celery.schedules import schedule as celery_schedule
    from celery.schedules import solar

    assert parse(celery_crontab(minute="*/10", hour="8-18", day_of_week="mon-fri")) == crontab(
        minute="*/10", hour="8-18", day_of_week="mon-fri"
    )
    assert parse(celery_schedule(timedelta(seconds=45))) == every(45)
    not_built = solar.__new__(solar)  # a real one needs the ephem library
    with pytest.raises(ScheduleError, match="solar"):
        parse(not_built)


def test_a_celery_relative_schedule_is_refused_not_read_as_a_plain_interval() -> None:
    from celery.schedules import schedule as celery_schedule

    # relative=True is refused in an entry's keys; given on Celery's own object it was dropped
    with pytest.raises(ScheduleError, match="relative=True"):
        parse(celery_schedule(timedelta(minutes=30), relative=True))
    assert parse(celery_schedule(timedelta(minutes=30), relative=False)) == every(1800)


def test_a_celery_schedule_with_its_own_clock_is_refused_not_read_in_another_zone() -> None:
    from celery.schedules import crontab as celery_crontab
    from celery.schedules import schedule as celery_schedule

    # Celery's way to tick a crontab in another zone; read from its fields it ticked in UTC
    def berlin_now() -> datetime:
        return datetime.now(BERLIN)

    with pytest.raises(ScheduleError, match="nowfun"):
        parse(celery_crontab(hour=7, minute=30, nowfun=berlin_now))
    with pytest.raises(ScheduleError, match="timezone"):
        parse(celery_schedule(timedelta(seconds=30), nowfun=berlin_now))


@pytest.mark.parametrize("zone_name", ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe"])
@pytest.mark.parametrize(
    "spec", ["30 2 * * *", "0,30 2,3 * * *", "15 * * * *", "*/20 1-3 * * 0", "0 0 29 2 *"]
)
def test_crontab_due_between_counts_as_stepping_tick_by_tick_does(
    zone_name: str, spec: str
) -> None:
    from millpond_beat.schedules import Schedule

    tz = ZoneInfo(zone_name)
    schedule = crontab(spec)
    # spans around each DST change of 2026 (both hemispheres), and ones a few hours long
    for since, until in [
        (ts(2026, 3, 1, 1, 7), ts(2026, 4, 20, 3, 1)),
        (ts(2026, 9, 20), ts(2026, 11, 9, 5, 30)),
        (ts(2026, 3, 29, 0, 30), ts(2026, 3, 29, 4)),
        (ts(2028, 2, 28, 12), ts(2028, 3, 1, 12)),
        (ts(2026, 6, 1, 2, 30), ts(2026, 6, 1, 2, 30)),
    ]:
        expected = Schedule.due_between(schedule, since, until, tz)
        assert schedule.due_between(since, until, tz) == expected, (since, until)


def test_a_minutely_crontab_away_100_days_is_caught_up_at_once_exactly() -> None:
    # stepping tick by tick took over a minute here (and stopped counting at 100,000, handing
    # the scheduler a tick 69 days old as "the latest", then another, ...)
    since, until = ts(2026, 1, 1), ts(2026, 4, 11, 0, 0, 30)
    assert crontab("* * * * *").due_between(since, until, BERLIN) == (ts(2026, 4, 11), 100 * 1440)
