"""The database beat schedule: rows added through the ORM and through the admin's add form are
ticked by a real `millpond beat` subprocess (`beat.source = "django"` in the test project's
settings, reload_interval 0.5 s), without a restart; disabling a row stops its ticks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import BeatProcess

from millpond.testing.harness import sqlite_url, wait_until

HERE = Path(__file__).parent


@pytest.fixture
def beat_world(django_project: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    from millpond_django import DjangoMillpond
    from millpond_django.models import PeriodicTask

    PeriodicTask.objects.all().delete()
    broker = sqlite_url(tmp_path)
    env = {
        "DJANGO_SETTINGS_MODULE": "djproj.settings",
        "DJPROJ_DATABASE": str(django_project),
        "DJPROJ_BROKER": broker,
        "PYTHONPATH": str(HERE),
    }
    app = DjangoMillpond("beat-observer", broker_url=broker)
    started: list[BeatProcess] = []

    def spawn() -> BeatProcess:
        beat = BeatProcess(env, tmp_path)
        started.append(beat)
        wait_until(lambda: beat.alive() and '"beat starting"' in beat.text(), 60, "beat to start")
        return beat

    yield {"app": app, "spawn": spawn}
    for beat in started:
        beat.stop()
    app.close()
    PeriodicTask.objects.all().delete()


def _ticks(app: Any, queue: str) -> int:
    return int(app.broker.queue_length(queue))


@pytest.mark.e2e
def test_rows_added_and_disabled_take_effect_without_a_restart(beat_world: dict[str, Any]) -> None:
    from millpond_django.models import PeriodicTask

    app = beat_world["app"]
    before = f"q-{uuid.uuid4().hex[:8]}"
    PeriodicTask.objects.create(
        name="before-start", task="shop.write_note", every=1, args=["tick"], queue=before
    )
    beat = beat_world["spawn"]()
    wait_until(lambda: beat.alive() and _ticks(app, before) >= 2, 30, "two ticks of before-start")

    added = f"q-{uuid.uuid4().hex[:8]}"
    row = PeriodicTask.objects.create(
        name="added-later", task="shop.write_note", every=1, args=["later"], queue=added
    )
    wait_until(lambda: beat.alive() and _ticks(app, added) >= 1, 30, "a tick of the added row")
    row.refresh_from_db()
    assert row.last_run_at is not None and row.total_run_count >= 1

    row.enabled = False
    row.save()
    wait_until(
        lambda: beat.alive() and "added-later" in _removed(beat.text()),
        30,
        "beat to drop the disabled row",
    )
    stopped_at, others = _ticks(app, added), _ticks(app, before)
    window = time.monotonic() + 2.5  # an observation window of 2.5 ticks: none may come
    while time.monotonic() < window:
        assert _ticks(app, added) == stopped_at, "a disabled row was still ticked"
        time.sleep(0.1)
    wait_until(
        lambda: beat.alive() and _ticks(app, before) > others, 30, "the other row to keep ticking"
    )
    assert _ticks(app, added) == stopped_at, "a disabled row was still ticked"


def _removed(log: str) -> str:
    """The `removed` lists of beat's 'beat schedule changed' lines, joined."""
    import json

    found = []
    for line in log.splitlines():
        if '"beat schedule changed"' in line:
            found += json.loads(line).get("removed", [])
    return " ".join(found)


@pytest.mark.e2e
def test_a_row_added_in_the_admin_is_ticked(beat_world: dict[str, Any]) -> None:
    from django.contrib.auth.models import User
    from django.test import Client

    from millpond_django.models import PeriodicTask, ScheduleChange

    app = beat_world["app"]
    beat = beat_world["spawn"]()
    admin, _ = User.objects.get_or_create(
        username="admin", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client()
    client.force_login(admin)
    counter = ScheduleChange.objects.filter(ident=1).values_list("counter", flat=True).first()
    queue = f"q-{uuid.uuid4().hex[:8]}"
    form = {
        "name": "from-the-admin",
        "task": "shop.write_note",
        "enabled": "on",
        "kind": "crontab",
        "crontab": "* * * * *",
        "args": '["admin"]',
        "kwargs": "{}",
        "queue": queue,
    }
    bad = client.post("/admin/millpond_django/periodictask/add/", {**form, "crontab": "61 * * *"})
    assert bad.status_code == 200 and b"errorlist" in bad.content, "a bad crontab is refused"
    assert not PeriodicTask.objects.filter(name="from-the-admin").exists()
    # every second: the form is saved as a crontab and changed to an interval, both in the admin
    response = client.post("/admin/millpond_django/periodictask/add/", form)
    assert response.status_code == 302, response.content.decode()[-3000:]
    row = PeriodicTask.objects.get(name="from-the-admin")
    new_counter = ScheduleChange.objects.values_list("counter", flat=True).get(ident=1)
    assert new_counter != counter, "saving in the admin bumps the change counter"
    response = client.post(
        f"/admin/millpond_django/periodictask/{row.pk}/change/",
        {**form, "kind": "interval", "every": "1", "crontab": ""},
    )
    assert response.status_code == 302, response.content.decode()[-3000:]
    wait_until(lambda: beat.alive() and _ticks(app, queue) >= 2, 30, "two ticks of the admin row")


@pytest.mark.e2e
def test_beat_on_a_database_without_the_tables_says_to_migrate(tmp_path: Path) -> None:
    env = {
        "DJANGO_SETTINGS_MODULE": "djproj.settings",
        "DJPROJ_DATABASE": str(tmp_path / "empty.sqlite3"),
        "DJPROJ_BROKER": sqlite_url(tmp_path),
        "PYTHONPATH": str(HERE),
    }
    beat = BeatProcess(env, tmp_path)
    try:
        assert beat.proc.wait(60) == 2, beat.text()[-3000:]
    finally:
        beat.stop()
    assert "migrate millpond_django" in beat.text()
