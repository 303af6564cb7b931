"""The scheduler loop on a fake clock and the memory broker: years of ticks in well under a second
per zone, checked against references computed here from zoneinfo alone."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from beat_helpers import TickRecorder

from millpond import Millpond
from millpond_beat import FakeClock, crontab, every
from millpond_beat.entries import Entry, build
from millpond_beat.scheduler import Beat, BeatConfig

START = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
END = datetime(2027, 1, 1, tzinfo=UTC).timestamp()
#: a lease that outlives the simulated year: renewals would only add rounds
SIMULATION = BeatConfig(lease_timeout=400 * 86400, reload_interval=0, max_sleep=400 * 86400)


def simulate(app: Millpond, entries: dict[str, Entry], until: float, start: float = START) -> Beat:
    clock = FakeClock(start)
    beat = Beat(app, entries, app.broker.claims(), SIMULATION, clock=clock)
    while clock.time() < until:
        clock.advance(max(beat.step(), 1e-6))
    return beat


def reference(tz: ZoneInfo, keep: Callable[[datetime], bool], *, once_a_day: bool) -> list[float]:
    """Brute force over every quarter hour of real time: the instants whose local wall clock
    satisfies `keep`; with `once_a_day`, only the first such instant of each local date (that is
    what "a fixed-time job runs once a day, as soon as its time has come" means)."""
    out: list[float] = []
    # the scheduler starts at START and ticks after it: when START's local date had already
    # reached the job's time, that date's run is over before the scheduler started
    first = datetime.fromtimestamp(START, tz)
    seen: set[date] = {first.date()} if keep(first) else set()
    u = START + 900
    while u < END:
        local = datetime.fromtimestamp(u, tz)
        if keep(local) and not (once_a_day and local.date() in seen):
            out.append(u)
            seen.add(local.date())
        u += 900
    return out


FIXED = [
    # zone, hour, minute: chosen to fall in that zone's spring gap, or its autumn overlap
    ("Europe/Berlin", 2, 30),  # both: 02:00-03:00 is skipped in March, repeated in October
    ("America/New_York", 2, 30),  # skipped in March
    ("America/New_York", 1, 30),  # repeated in November
    ("Australia/Lord_Howe", 2, 15),  # 30-minute gap (02:00 -> 02:30) in October
    ("Australia/Lord_Howe", 1, 45),  # 30-minute overlap (02:00 -> 01:30) in April
]


@pytest.mark.parametrize(("zone_name", "hour", "minute"), FIXED)
def test_daily_fixed_time_over_a_year_matches_zoneinfo(
    memory_app: Millpond, recorder: TickRecorder, zone_name: str, hour: int, minute: int
) -> None:
    tz = ZoneInfo(zone_name)
    memory_app.add_hooks(recorder)
    entry = Entry("daily", "t", crontab(minute=minute, hour=hour), tz)
    simulate(memory_app, {"daily": entry}, END)
    expected = reference(
        tz, lambda local: (local.hour, local.minute) >= (hour, minute), once_a_day=True
    )
    got = [t for t in recorder.of("daily") if t < END]
    assert len(expected) >= 364
    assert got == expected
    # the reference is not vacuous: one day of the year ran at a wall time other than the
    # scheduled one (the end of the gap), or ran at the earlier of two identical wall times
    walls = {
        (datetime.fromtimestamp(t, tz).hour, datetime.fromtimestamp(t, tz).minute) for t in got
    }
    offsets = {datetime.fromtimestamp(t, tz).utcoffset() for t in got}
    assert len(offsets) == 2
    assert walls != {(hour, minute)} or _has_overlap_day(tz, hour, minute)


def _has_overlap_day(tz: ZoneInfo, hour: int, minute: int) -> bool:
    for day in range(365):
        wall = datetime(2026, 1, 1, hour, minute) + timedelta(days=day)
        if (
            wall.replace(tzinfo=tz, fold=0).utcoffset()
            != wall.replace(tzinfo=tz, fold=1).utcoffset()
        ):
            return True
    return False


@pytest.mark.parametrize("zone_name", ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe"])
def test_hourly_follows_the_real_clock_over_a_year(
    memory_app: Millpond, recorder: TickRecorder, zone_name: str
) -> None:
    tz = ZoneInfo(zone_name)
    memory_app.add_hooks(recorder)
    entry = Entry("hourly", "t", crontab("30 * * * *"), tz)
    simulate(memory_app, {"hourly": entry}, END)
    expected = reference(tz, lambda local: local.minute == 30, once_a_day=False)
    got = [t for t in recorder.of("hourly") if t < END]
    assert got == expected
    walls = [datetime.fromtimestamp(t, tz).replace(tzinfo=None) for t in got]
    assert len(set(walls)) < len(walls)  # the overlap's wall hour ticked twice


def test_a_fixed_time_in_the_gap_runs_at_its_end_and_never_twice(
    memory_app: Millpond, recorder: TickRecorder
) -> None:
    memory_app.add_hooks(recorder)
    berlin = ZoneInfo("Europe/Berlin")
    entry = Entry("daily", "t", crontab("30 2 * * *"), berlin)
    simulate(memory_app, {"daily": entry}, END)
    by_date = {}
    for t in recorder.of("daily"):
        local = datetime.fromtimestamp(t, berlin)
        assert local.date() not in by_date, f"ran twice on {local.date()}"
        by_date[local.date()] = local
    assert by_date[date(2026, 3, 29)].strftime("%H:%M %Z") == "03:00 CEST"
    assert by_date[date(2026, 10, 25)].strftime("%H:%M %Z") == "02:30 CEST"
    assert by_date[date(2026, 10, 26)].strftime("%H:%M %Z") == "02:30 CET"


def test_ticks_go_through_the_producer_path_with_the_entry_options(
    memory_app: Millpond, recorder: TickRecorder
) -> None:
    @memory_app.task
    def add(x: int, y: int) -> int:
        return x + y

    memory_app.add_hooks(recorder)
    memory_app.add_periodic_task(10, add.s(2, 3), name="add", queue="q1", expires=5, priority=3)
    entries = build(memory_app, {})
    simulate(memory_app, entries, START + 35)
    assert recorder.of("add") == [START + 10, START + 20, START + 30]
    first = recorder.ticks[0]
    assert (first.task, first.queue) == (add.name, "q1")
    assert first.headers["celery_beat_task"] is True
    assert memory_app.broker.queue_length("q1") == 3
    consumer = memory_app.broker.consumer(["q1"], 10)
    deliveries = consumer.fetch(10, 1.0)
    # expires counts from when the tick was sent (here: on time, at 00:00:10)
    assert deliveries[0].message.headers["expires"].startswith("2026-01-01T00:00:15")
    consumer.close()


def test_a_tick_goes_to_the_task_s_own_queue_unless_the_entry_names_one(
    memory_app: Millpond, recorder: TickRecorder
) -> None:
    @memory_app.task(queue="reports")
    def report() -> None: ...

    memory_app.add_hooks(recorder)
    memory_app.add_periodic_task(10, report.s(), name="own")
    memory_app.add_periodic_task(10, report.s(), name="named", queue="elsewhere")
    simulate(memory_app, build(memory_app, {}), START + 15)
    assert {t.entry: t.queue for t in recorder.ticks} == {"own": "reports", "named": "elsewhere"}


@pytest.mark.parametrize(("policy", "published"), [("run_once", 1), ("skip", 0)])
def test_ticks_nobody_published_follow_the_catch_up_policy(
    memory_app: Millpond, recorder: TickRecorder, policy: str, published: int
) -> None:
    memory_app.add_hooks(recorder)
    entry = Entry("hourly", "t", every(3600), UTC, catch_up=policy)
    claims = memory_app.broker.claims()
    clock = FakeClock(START)
    config = BeatConfig(lease_timeout=5, reload_interval=0)
    first = Beat(memory_app, {"hourly": entry}, claims, config, clock=clock, name="a")
    first.step()
    clock.advance(3600)
    first.step()  # publishes 01:00
    assert recorder.of("hourly") == [START + 3600]
    first._step_down("test")
    clock.advance(5 * 3600 + 600)
    second = Beat(memory_app, {"hourly": entry}, claims, config, clock=clock, name="b")
    second.step()
    ticks = recorder.of("hourly")
    assert len(ticks) == 1 + published
    if published:
        assert ticks[-1] == START + 6 * 3600  # the latest missed one, once
    # and from then on it is on time again
    clock.now = START + 7 * 3600
    second.step()
    assert recorder.of("hourly")[-1] == START + 7 * 3600


def test_a_tick_caught_up_late_is_sent_with_its_expiry_still_ahead(
    memory_app: Millpond, recorder: TickRecorder
) -> None:
    # Celery's expires counts from when beat sends the message: the one run a restarted beat
    # catches up must not arrive already expired (a worker would drop it: a lost run)
    memory_app.add_hooks(recorder)
    entry = Entry("hourly", "t", every(3600), UTC, expires=600, options={"queue": "caught"})
    claims = memory_app.broker.claims()
    clock = FakeClock(START)
    config = BeatConfig(lease_timeout=5, reload_interval=0)
    first = Beat(memory_app, {"hourly": entry}, claims, config, clock=clock, name="a")
    first.step()
    first._step_down("test")
    clock.advance(2 * 3600 + 1800)  # down from 00:00 to 02:30: 01:00 and 02:00 fell due
    Beat(memory_app, {"hourly": entry}, claims, config, clock=clock, name="b").step()
    assert recorder.of("hourly") == [START + 2 * 3600]
    consumer = memory_app.broker.consumer(["caught"], 10)
    (delivery,) = consumer.fetch(10, 1.0)
    consumer.close()
    expires = datetime.fromisoformat(delivery.message.headers["expires"]).timestamp()
    assert expires == pytest.approx(clock.time() + 600)


def test_a_minutely_crontab_away_100_days_publishes_its_latest_tick_once(
    memory_app: Millpond, recorder: TickRecorder
) -> None:
    # Celery runs a missed entry once; stepping tick by tick took minutes here, and stopped at
    # 100,000 ticks, publishing one 69 days old, then more, one per round
    memory_app.add_hooks(recorder)
    entry = Entry("minutely", "t", crontab("* * * * *"), ZoneInfo("Europe/Berlin"))
    claims = memory_app.broker.claims()
    claims.save_state(BeatConfig().state_key, {"minutely": repr(START - 100 * 86400)})
    clock = FakeClock(START + 30)
    beat = Beat(memory_app, {"minutely": entry}, claims, BeatConfig(), clock=clock)
    beat.step()
    beat.step()
    assert recorder.of("minutely") == [START]
    clock.advance(30)
    beat.step()
    assert recorder.of("minutely") == [START, START + 60]


def test_two_replicas_one_leader_each_tick_once(
    memory_app: Millpond, recorder: TickRecorder
) -> None:
    memory_app.add_hooks(recorder)
    entry = Entry("sec", "t", every(1), UTC)
    claims = memory_app.broker.claims()
    clock = FakeClock(START)
    config = BeatConfig(lease_timeout=3, reload_interval=0)
    a = Beat(memory_app, {"sec": entry}, claims, config, clock=clock, name="a")
    b = Beat(memory_app, {"sec": entry}, claims, config, clock=clock, name="b")
    for _ in range(200):
        a.step()
        b.step()
        clock.advance(0.25)
    assert a.leading != b.leading
    ticks = recorder.of("sec")
    assert len(ticks) == len(set(ticks)) == 49  # 00:00:01 .. 00:00:49


def test_a_frozen_leader_that_resumes_does_not_publish_a_tick_again(
    memory_app: Millpond, recorder: TickRecorder
) -> None:
    memory_app.add_hooks(recorder)
    entry = Entry("sec", "t", every(1), UTC)
    claims = memory_app.broker.claims()
    clock = FakeClock(START)
    config = BeatConfig(lease_timeout=3, reload_interval=0)
    a = Beat(memory_app, {"sec": entry}, claims, config, clock=clock, name="a")
    b = Beat(memory_app, {"sec": entry}, claims, config, clock=clock, name="b")
    a.step()
    assert a.leading
    # b takes over (a's lease is released as if it had run out), publishes a tick...
    claims.release(config.leader_key, "a")
    clock.advance(1)
    b.step()
    assert b.leading
    # ...and a, which still thinks it leads, tries the same tick
    a._lease_until = clock.time() + 10
    a._publish_due(clock.time())
    assert recorder.of("sec") == [START + 1]


def test_schedule_changes_are_picked_up_without_restart(
    memory_app: Millpond, recorder: TickRecorder
) -> None:
    memory_app.add_hooks(recorder)
    table: dict[str, dict[str, object]] = {"a": {"task": "t", "schedule": 10}}
    clock = FakeClock(START)
    config = BeatConfig(lease_timeout=5, reload_interval=1)

    def reload() -> dict[str, Entry]:
        return build(memory_app, table, check_tasks=False)

    beat = Beat(
        memory_app, reload(), memory_app.broker.claims(), config, clock=clock, reload=reload
    )
    while clock.time() < START + 25:
        clock.advance(max(beat.step(), 1e-6))
    table["b"] = {"task": "t", "schedule": "*/1 * * * *"}
    table["a"] = {"task": "t", "schedule": 5}
    while clock.time() < START + 125:
        clock.advance(max(beat.step(), 1e-6))
    # the new period from the change on
    assert recorder.of("a")[:5] == [START + 10, START + 20, START + 30, START + 35, START + 40]
    assert recorder.of("b") == [START + 60, START + 120]


@pytest.mark.parametrize("restarted", [True, False])
def test_an_entry_removed_then_added_back_starts_afresh_as_in_celery(
    memory_app: Millpond, recorder: TickRecorder, restarted: bool
) -> None:
    # Celery beat drops a removed entry from its schedule file, so one added back (or enabled
    # again) starts afresh; its old last run must not make the next leader "catch up" a tick
    memory_app.add_hooks(recorder)
    entry = Entry("hourly", "t", every(3600), UTC)
    other = Entry("other", "t", every(86400), UTC)
    claims = memory_app.broker.claims()
    config = BeatConfig(lease_timeout=5, reload_interval=1)
    clock = FakeClock(START)
    entries: dict[str, Entry] = {"hourly": entry, "other": other}
    beat = Beat(memory_app, entries, claims, config, clock=clock, name="a")
    beat.step()
    clock.advance(3600)
    beat.step()
    assert recorder.of("hourly") == [START + 3600]
    if restarted:  # a restart without it (enabled = false), then one with it
        beat._step_down("restart")
        beat = Beat(memory_app, {"other": other}, claims, config, clock=clock, name="b")
        beat.step()
    else:  # the settings file changes under the running leader
        beat.reload = lambda: {"other": other}
        clock.advance(1)
        beat.step()
    assert beat.leading
    beat._step_down("restart")
    clock.advance(3 * 3600)  # 02:00, 03:00 and 04:00 fall due while it is away
    for replica in ("c", "d"):  # it is back; and a leader after that one
        clock.advance(1)
        back = Beat(memory_app, {"hourly": entry, "other": other}, claims, config, clock=clock,
                    name=replica)  # fmt: skip
        back.step()
        assert back.leading
        back._step_down("next")
    assert recorder.of("hourly") == [START + 3600]
    clock.now = START + 5 * 3600  # and from then on on time
    back.step()
    assert recorder.of("hourly") == [START + 3600, START + 5 * 3600]


def test_a_first_tick_due_while_the_leader_changes_is_not_lost(
    memory_app: Millpond, recorder: TickRecorder
) -> None:
    memory_app.add_hooks(recorder)
    entry = Entry("daily", "t", crontab("30 2 * * *"), UTC)
    claims = memory_app.broker.claims()
    config = BeatConfig(lease_timeout=5, reload_interval=0)
    clock = FakeClock(START)  # 00:00: the first tick is 02:30, nobody has published one yet
    first = Beat(memory_app, {"daily": entry}, claims, config, clock=clock, name="a")
    first.step()
    first._step_down("killed")
    clock.now = START + 2.5 * 3600 + 60  # the new leader comes a minute after the tick
    second = Beat(memory_app, {"daily": entry}, claims, config, clock=clock, name="b")
    second.step()
    assert recorder.of("daily") == [START + 2.5 * 3600]  # caught up (run_once), late


def test_tick_claims_that_end_with_their_holder_are_released_once_published(
    memory_app: Millpond, recorder: TickRecorder
) -> None:
    """On a broker whose claims die with the holder's connection (RabbitMQ) the leader does not
    keep a claim (a queue) per tick; where claims outlive the holder it keeps them, as fences."""
    from millpond_broker_embedded.memory import MemoryClaims

    class ConnectionBound(MemoryClaims):
        outlives_holder = False

    memory_app.add_hooks(recorder)
    entry = Entry("sec", "t", every(1), UTC)
    config = BeatConfig(lease_timeout=5, reload_interval=0)
    for claims, kept in ((ConnectionBound(), False), (MemoryClaims(), True)):
        clock = FakeClock(START)
        beat = Beat(memory_app, {"sec": entry}, claims, config, clock=clock, name="a")
        beat.step()
        clock.advance(1)
        beat.step()
        assert (claims.holder(config.tick_key("sec", START + 1)) is not None) is kept


def test_a_leader_killed_right_after_publishing_is_not_followed_by_a_second_copy(
    memory_app: Millpond, recorder: TickRecorder
) -> None:
    """Where a tick's claim dies with its holder (RabbitMQ), the successor cannot see that the
    dead leader's last tick went out; the tick is in the state before it is published, so a
    leader killed between publishing and its usual state write costs no duplicate."""
    from millpond_broker_embedded.memory import MemoryClaims

    class ConnectionBound(MemoryClaims):
        outlives_holder = False

    memory_app.add_hooks(recorder)
    entry = Entry("sec", "t", every(1), UTC)
    config = BeatConfig(lease_timeout=3, reload_interval=0)
    claims = ConnectionBound()
    clock = FakeClock(START)
    first = Beat(memory_app, {"sec": entry}, claims, config, clock=clock, name="a")
    first.step()
    assert first.leading
    clock.advance(1)
    # the leader dies after its tick left and before it wrote the state: no save gets through
    # any more, and its claims go with its connection
    first._save = lambda name, value: None  # type: ignore[method-assign]
    first.step()
    assert recorder.of("sec") == [START + 1]
    for key in (config.leader_key, config.tick_key("sec", START + 1)):
        claims.release(key, "a")
    second = Beat(memory_app, {"sec": entry}, claims, config, clock=clock, name="b")
    second.step()
    clock.advance(1)
    second.step()
    assert recorder.of("sec") == [START + 1, START + 2]
