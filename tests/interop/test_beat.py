"""A Celery project's `beat_schedule` (Celery's crontab and timedelta objects) runs unchanged under
`millpond beat`, and a real Celery 5.7 worker runs the ticks."""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.interop import sink
from tests.interop.conftest import REDIS, WAIT, Worker, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.e2e]


def _start(tag: str, tmp_path: Path) -> list[Worker]:
    """A Celery worker on the test's queue, and `millpond beat` running the Celery config."""
    queue, key = f"beat-interop-{tag}", f"beat-interop-sink-{tag}"
    env = {"BEAT_QUEUE": queue, "BEAT_KEY": key}
    celery_cmd = (
        f"-m celery -A tests.interop.celery_app worker -P threads -c 2 -Q {queue} "
        f"-n beat-{tag}@%h --without-mingle --without-gossip --without-heartbeat -l INFO"
    )
    return [
        Worker(
            "celery",
            [sys.executable, *celery_cmd.split()],
            {**env, "INTEROP_BROKER": REDIS, "INTEROP_BACKEND": REDIS, "INTEROP_QUEUE": queue},
            tmp_path / "celery.log",
        ),
        Worker(
            "beat",
            [sys.executable, "-m", "millpond", "beat", "-A", "tests.interop.beat_app:app"],
            {
                **env,
                "MILLPOND_BROKER_URL": REDIS,
                "MILLPOND_BEAT__KEY_PREFIX": f"beat-interop-{tag}",
                "MILLPOND_LOG_FORMAT": "json",
            },
            tmp_path / "beat.log",
        ),
    ]


def _clean(tag: str, workers: list[Worker]) -> None:
    for w in workers:
        w.stop()
    client = sink.client()
    queue, key = f"beat-interop-{tag}", f"beat-interop-sink-{tag}"
    client.delete(key, queue, f"beat-interop-{tag}:state", f"beat-interop-{tag}:leader")
    for name in client.scan_iter(f"beat-interop-{tag}:tick:*"):
        client.delete(name)


def test_a_run_caught_up_after_downtime_is_run_by_celery_not_dropped_as_expired(
    tmp_path: Path,
) -> None:
    # the state says "new-year" (yearly, expires = 60) last ran over a year ago: the restarted
    # beat owes its latest tick, months late, once; Celery's expires counts from the sending
    tag = uuid.uuid4().hex[:10]
    key = f"beat-interop-sink-{tag}"
    sink.client().hset(f"beat-interop-{tag}:state", "new-year", repr(time.time() - 400 * 86400))
    workers = _start(tag, tmp_path)
    try:

        def caught() -> list[dict[str, object]]:
            for w in workers:
                w.check_alive()
            raw = sink.client().lrange(key, 0, -1)
            return [r for r in map(json.loads, raw) if r["value"] == "new-year"]

        got = wait_until(
            caught,
            WAIT,
            lambda: (
                f"the caught-up run, by Celery\n{workers[0].text()[-3000:]}\n"
                f"{workers[1].text()[-3000:]}"
            ),
        )
        assert [r["side"] for r in got] == ["celery"]
    finally:
        _clean(tag, workers)


def test_celery_beat_schedule_runs_unchanged_and_celery_runs_the_ticks(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:10]
    queue, key = f"beat-interop-{tag}", f"beat-interop-sink-{tag}"
    env = {"BEAT_QUEUE": queue, "BEAT_KEY": key}
    workers = _start(tag, tmp_path)
    try:
        listing = Worker(
            "list",
            [
                sys.executable,
                "-m",
                "millpond",
                "beat",
                "-A",
                "tests.interop.beat_app:app",
                "--list",
            ],
            {
                **env,
                "MILLPOND_BROKER_URL": REDIS,
                "MILLPOND_BEAT__KEY_PREFIX": f"beat-interop-{tag}",
            },
            tmp_path / "list.log",
        )
        assert listing.proc.wait(WAIT) == 0, listing.text()
        listing.stop()
        text = listing.text()
        assert "Record Every Second" in text
        assert "crontab 30 2 * * mon-fri [Europe/Berlin]" in text, text

        def ticks() -> list[dict[str, object]]:
            for w in workers:
                w.check_alive()
            raw = sink.client().lrange(key, 0, -1)
            return [json.loads(r) for r in raw if json.loads(r)["value"] == "tick"]

        got = wait_until(
            lambda: len(ticks()) >= 3 and ticks(),
            WAIT,
            lambda: (
                f"three ticks run by Celery\n{workers[0].text()[-3000:]}\n{workers[1].text()[-3000:]}"
            ),
        )
        assert all(t["side"] == "celery" for t in got)
        published = [
            json.loads(line)
            for line in workers[1].text().splitlines()
            if line.startswith("{") and '"beat published"' in line
        ]
        assert {p["entry"] for p in published} >= {"Record Every Second"}
    finally:
        _clean(tag, workers)
