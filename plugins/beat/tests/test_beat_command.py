"""Entries from code and settings, checked at start-up; `millpond beat --list`; spans and metrics."""

from __future__ import annotations

import textwrap
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from beat_helpers import TickRecorder

from millpond import Millpond
from millpond.exceptions import ConfigurationError
from millpond_beat import FakeClock, crontab, every
from millpond_beat.entries import build
from millpond_beat.scheduler import Beat, BeatConfig
from millpond_cli.main import main

START = 1_800_000_000.0  # 2027-01-15 08:00 UTC


def test_code_entries_take_celery_shapes(memory_app: Millpond) -> None:
    @memory_app.task
    def add(x: int, y: int) -> int:
        return x + y

    memory_app.add_periodic_task(30.0, add.s(2, 2))  # named as Celery names it
    memory_app.add_periodic_task(
        crontab(hour=7, minute=30, day_of_week=1), add.s(1, 1), name="monday", timezone="Asia/Tokyo"
    )

    @memory_app.periodic_task("0 * * * *", catch_up="skip")
    def hourly() -> None: ...

    entries = build(memory_app, {})
    assert set(entries) == {f"{add.name}(2, 2)", "monday", hourly.name}
    assert entries[f"{add.name}(2, 2)"].schedule == every(30)
    assert entries["monday"].zone_name == "Asia/Tokyo"
    assert entries[hourly.name].catch_up == "skip"


def test_code_entries_take_the_call_s_args_as_partial_arguments_as_celery_does(
    memory_app: Millpond,
) -> None:
    @memory_app.task
    def scale(x: int, y: int, factor: int = 1, shift: int = 0) -> int:
        return (x + y) * factor + shift

    # Celery's add_periodic_task clones the signature with the call's args and kwargs: the args
    # go before the signature's, the kwargs are merged over its; an immutable one keeps its own
    memory_app.add_periodic_task(10, scale.s(2, factor=3), args=(1,), kwargs={"shift": 4}, name="p")
    memory_app.add_periodic_task(10, scale.si(2, 5), args=(1,), kwargs={"shift": 4}, name="i")
    memory_app.add_periodic_task(10, scale, args=(1, 2), name="t")
    entries = build(memory_app, {})
    assert (entries["p"].args, dict(entries["p"].kwargs)) == ((1, 2), {"factor": 3, "shift": 4})
    assert (entries["i"].args, dict(entries["i"].kwargs)) == ((2, 5), {})
    assert (entries["t"].args, dict(entries["t"].kwargs)) == ((1, 2), {})


def test_settings_entries_in_celery_beat_schedule_shape(memory_app: Millpond) -> None:
    table = {
        "Send Report": {
            "task": "reports.send",
            "schedule": "0 7 * * mon-fri",
            "args": [1],
            "kwargs": {"full": True},
            "options": {"queue": "reports", "expires": 600, "priority": 5},
            "timezone": "Europe/Berlin",
        },
        "once": {"task": "reports.send", "at": "2030-01-01T00:00:00+00:00"},
        "off": {"task": "reports.send", "schedule": 5, "enabled": False},
    }
    entries = build(memory_app, table, check_tasks=False)
    assert set(entries) == {"Send Report", "once"}
    report = entries["Send Report"]
    assert (report.args, dict(report.kwargs), report.expires) == ((1,), {"full": True}, 600.0)
    assert dict(report.options) == {"queue": "reports", "priority": 5}


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"task": "t", "schedule": "61 * * * *"}, "bad crontab minute"),
        ({"task": "t", "schedule": 5, "timezone": "Nowhere/City"}, "unknown time zone"),
        ({"task": "nope", "schedule": 5}, "does not register"),
        ({"schedule": 5}, "no task"),
        ({"task": "t"}, "no schedule"),
        ({"task": "t", "schedule": 5, "options": {"link": "x"}}, "option 'link'"),
        ({"task": "t", "schedule": 5, "options": {"exchange_type": "x"}}, "unknown option"),
        ({"task": "t", "schedule": 5, "relative": True}, "relative"),
        ({"task": "t", "schedule": 5, "catch_up": "all"}, "catch_up"),
        ({"task": "t", "schedule": 5, "sheduel": 1}, "unknown key 'sheduel'"),
        ({"task": "t", "schedule": 5, "args": [object()]}, "JSON values"),
        # an option's value is checked at start too: a bad one failed only at each publish (a
        # bad headers even before the try, failing the round, so later entries never ran)
        ({"task": "t", "schedule": 5, "options": {"headers": 5}}, "headers must be a table"),
        ({"task": "t", "schedule": 5, "options": {"headers": "x"}}, "headers must be a table"),
        ({"task": "t", "schedule": 5, "queue": 5}, "queue must be a queue name"),
        ({"task": "t", "schedule": 5, "options": {"priority": "high"}}, "priority must be"),
        ({"task": "t", "schedule": 5, "options": {"countdown": "soon"}}, "countdown must be"),
        ({"task": "t", "schedule": 5, "options": {"time_limit": -1}}, "time_limit must be"),
        ({"task": "t", "schedule": 5, "options": {"ignore_result": "no"}}, "ignore_result must"),
    ],
)
def test_bad_entries_fail_naming_the_entry(
    memory_app: Millpond, spec: dict[str, Any], words: str
) -> None:
    @memory_app.task(name="t")
    def t() -> None: ...

    with pytest.raises(ConfigurationError, match=words) as info:
        build(memory_app, {"the-entry": spec})
    assert "'the-entry'" in str(info.value)


def test_celery_routing_options_are_read_as_the_queue(memory_app: Millpond) -> None:
    spec = {"task": "t", "schedule": 5, "options": {"exchange": "e", "routing_key": "q9"}}
    entries = build(memory_app, {"routed": spec}, check_tasks=False)
    assert dict(entries["routed"].options) == {"queue": "q9"}


def _project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str) -> None:
    (tmp_path / "beatproj.py").write_text(
        textwrap.dedent(
            """
            from millpond import Millpond
            from millpond_beat import crontab

            app = Millpond("proj")

            @app.task
            def add(x, y):
                return x + y

            app.add_periodic_task(10.0, add.s(1, 2), name="add-every-10s")
            """
        )
    )
    (tmp_path / "millpond.toml").write_text(textwrap.dedent(toml))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MILLPOND_BROKER_URL", f"sqlite://{tmp_path / 'broker.sqlite3'}")


def test_list_shows_entries_next_runs_and_the_leader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _project(
        tmp_path,
        monkeypatch,
        """
        [beat]
        timezone = "America/New_York"

        [beat.schedule.Nightly]
        task = "beatproj.add"
        schedule = "30 2 * * *"
        args = [3, 4]
        """,
    )
    assert main(["beat", "-A", "beatproj:app", "--list"]) == 0
    out = capsys.readouterr().out
    assert "leader: none" in out
    assert "add-every-10s" in out
    assert "every 10s" in out
    nightly = next(line for line in out.splitlines() if line.startswith("Nightly"))
    assert "crontab 30 2 * * * [America/New_York]" in nightly
    assert "02:30:00 E" in nightly  # EST or EDT, local
    assert ":30:00Z" in nightly  # and in UTC


def test_bad_input_exits_2_naming_the_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _project(
        tmp_path,
        monkeypatch,
        """
        [beat.schedule.broken]
        task = "beatproj.add"
        schedule = "* * * * funday"
        """,
    )
    assert main(["beat", "-A", "beatproj:app", "--list"]) == 2
    err = capsys.readouterr().err
    assert "beat schedule entry 'broken' (settings)" in err
    assert "day_of_week" in err


def test_each_tick_is_a_publish_span_naming_the_entry(
    memory_app: Millpond, span_exporter: Any
) -> None:
    span_exporter.clear()
    clock = FakeClock(START)
    memory_app.add_periodic_task(5, "t", name="five")
    entries = build(memory_app, {}, check_tasks=False)
    beat = Beat(memory_app, entries, memory_app.broker.claims(), BeatConfig(), clock=clock)
    beat.step()
    clock.advance(5)
    beat.step()
    spans = [s for s in span_exporter.get_finished_spans() if s.name.startswith("publish")]
    assert len(spans) == 1
    assert spans[0].attributes["millpond.beat.entry"] == "five"
    assert spans[0].attributes["millpond.task.name"] == "t"


def test_ticks_published_missed_and_late_are_counted(
    memory_app: Millpond, recorder: TickRecorder
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    clock = FakeClock(START)
    memory_app.add_hooks(recorder)
    memory_app.add_periodic_task(60, "t", name="minute")
    entries = build(memory_app, {}, check_tasks=False)
    config = BeatConfig(lease_timeout=5)
    beat = Beat(
        memory_app,
        entries,
        memory_app.broker.claims(),
        config,
        clock=clock,
        meter_provider=provider,
    )
    beat.step()
    clock.now = START + 60
    beat.step()  # on time
    clock.now = START + 60 * 4 + 10  # two missed, the third published 10 s late (run_once)
    beat.step()
    counts: dict[str, int] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                counts[metric.name] = sum(int(p.value) for p in metric.data.data_points)
    assert counts == {
        "millpond.beat.ticks.published": 2,
        "millpond.beat.ticks.missed": 2,
        "millpond.beat.ticks.late": 1,
    }
    assert recorder.of("minute") == [START + 60, START + 240]
    provider.shutdown()


def test_a_stopped_beat_hands_over_at_once(memory_app: Millpond) -> None:
    claims = memory_app.broker.claims()
    clock = FakeClock(START)
    config = BeatConfig(lease_timeout=10)
    a = Beat(memory_app, {}, claims, config, clock=clock, name="a")
    b = Beat(memory_app, {}, claims, config, clock=clock, name="b")
    a.step()
    b.step()
    assert a.leading and not b.leading
    a.stop()
    a.run()  # returns at once, stepping down
    clock.advance(2)
    b.step()
    assert b.leading
    assert claims.holder(config.leader_key).owner == "b"  # type: ignore[union-attr]


def test_at_entries_tick_once(memory_app: Millpond, recorder: TickRecorder) -> None:
    from datetime import datetime

    memory_app.add_hooks(recorder)
    when = datetime.fromtimestamp(START + 30, UTC)
    entries = build(memory_app, {"once": {"task": "t", "at": when.isoformat()}}, check_tasks=False)
    clock = FakeClock(START)
    beat = Beat(memory_app, entries, memory_app.broker.claims(), BeatConfig(), clock=clock)
    while clock.time() < START + 600:
        clock.advance(max(beat.step(), 0.5))
    assert recorder.of("once") == [START + 30]


def test_an_at_entry_already_past_when_first_scheduled_says_it_will_never_run(
    memory_app: Millpond, recorder: TickRecorder
) -> None:
    from datetime import datetime

    from structlog.testing import capture_logs

    memory_app.add_hooks(recorder)
    when = datetime.fromtimestamp(START - 30, UTC).isoformat()
    entries = build(memory_app, {"gone": {"task": "t", "at": when}}, check_tasks=False)
    clock = FakeClock(START)
    beat = Beat(memory_app, entries, memory_app.broker.claims(), BeatConfig(), clock=clock)
    with capture_logs() as logs:
        beat.step()
    assert recorder.of("gone") == []
    (warning,) = [e for e in logs if "never run" in e["event"]]
    assert warning["entry"] == "gone" and warning["log_level"] == "warning"


def test_a_changed_settings_file_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from millpond.config.settings import load_settings
    from millpond_beat.command import SettingsWatch

    path = tmp_path / "millpond.toml"
    path.write_text('[beat.schedule.a]\ntask = "t"\nschedule = 10\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MILLPOND_SETTINGS_FILE", raising=False)
    app = Millpond("watch", broker_url="memory://watch")
    app.task(name="t")(lambda: None)
    app.configure(load_settings())
    watch = SettingsWatch(app, {})
    assert watch() is None  # unchanged since start-up
    path.write_text(
        '[beat.schedule.a]\ntask = "t"\nschedule = 20\n\n[beat.schedule.b]\ntask = "t"\nschedule = "0 * * * *"\n'
    )
    fresh = watch()
    assert fresh is not None
    assert set(fresh) == {"a", "b"}
    assert fresh["a"].schedule == every(20)
    assert watch() is None
    path.write_text('[beat.schedule.a]\ntask = "t"\nschedule = "99 * * * *"\n')
    with pytest.raises(ConfigurationError, match="entry 'a'"):
        watch()  # the running scheduler logs this and keeps its schedule
