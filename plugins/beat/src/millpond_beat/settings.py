"""The `[beat]` settings section (`MILLPOND_BEAT__LEASE_TIMEOUT=5` in the environment).

Published under the `millpond.settings` entry-point group as `beat`, so `millpond config` lists it
and docs/settings.md documents it. `schedule` takes Celery's `beat_schedule` dictionary shape, so a
Celery config's schedule moves over as it is (see docs/beat.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from millpond.config.options import Section, declared, setting

CATCH_UP = ("run_once", "skip")


@dataclass(frozen=True)
class BeatSettings:
    """The [beat] section: each field declares one setting (`SECTION` is derived from them)."""

    schedule: Mapping[str, Any] = setting(
        {},
        "Periodic entries by name, in Celery's beat_schedule shape: each a table with task, "
        "schedule (seconds, a five-field crontab string, or a table of crontab fields, {every ="
        " ...} or {at = ...}), and optionally args, kwargs, options, queue, expires, timezone, "
        "catch_up, enabled. Added to the entries declared in code; a changed settings file is "
        "picked up without a restart.",
        keep_case=True,
    )
    timezone: str = setting(
        "UTC",
        "The IANA time zone crontab and naive `at` times are read in, unless an entry names its"
        " own (Celery's `timezone`).",
    )
    lease_timeout: float = setting(
        5.0,
        "Seconds the leading replica's lease lasts without renewal: a leader that dies is "
        "replaced within this plus a third of it (it renews every third).",
        minimum=0.3,
        maximum=10.0,
    )
    catch_up: str = setting(
        "run_once",
        "What a leader does with ticks nobody published on time (the previous leader died, or "
        "every replica was down): run_once publishes the latest of them once, skip drops them. "
        "Per entry: catch_up.",
        choices=CATCH_UP,
    )
    late_after: float = setting(
        2.0,
        "Seconds after its time a tick counts as late: counted in the late metric, and dropped "
        "by catch_up = skip.",
        minimum=0.0,
    )
    check_tasks: bool = setting(
        True,
        "Refuse at start-up an entry whose task the app does not register. Turn off for a beat "
        "that sends tasks only other code defines (they still dead-letter on a worker that does"
        " not know them).",
    )
    reload_interval: float = setting(
        5.0,
        "Seconds between checks of the settings file for changed entries; 0 turns reloading off.",
        minimum=0.0,
    )
    source: str = setting(
        "",
        "A schedule source to take entries from as well, by name: django reads millpond-"
        "django's database schedule (editable in the Django admin). Polled for changes every "
        "reload_interval; empty: settings and code only.",
    )
    key_prefix: str = setting(
        "millpond.beat",
        "Prefix of the claim and state keys in the broker: two schedulers with different "
        "prefixes do not see each other.",
    )


SECTION = Section(
    "beat",
    "Periodic tasks (millpond beat)",
    declared(BeatSettings),
    hints={
        "max_loop_interval": "millpond beat sleeps until the next tick or lease renewal; there "
        "is nothing to tune",
        "scheduler": "the schedule lives in settings and code; its state is kept in the broker",
        "schedule_filename": "state is kept in the broker, not in a file",
    },
)
