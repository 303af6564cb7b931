"""The `[beat]` settings section (`MILLPOND_BEAT__LEASE_TIMEOUT=5` in the environment).

Published under the `millpond.settings` entry-point group as `beat`, so `millpond config` lists it
and docs/settings.md documents it. `schedule` takes Celery's `beat_schedule` dictionary shape, so a
Celery config's schedule moves over as it is (see docs/beat.md).
"""

from __future__ import annotations

from millpond.config.options import Option, Section

CATCH_UP = ("run_once", "skip")

SECTION = Section(
    "beat",
    "Periodic tasks (millpond beat)",
    (
        Option("schedule", "table", {}, "Periodic entries by name, in Celery's beat_schedule "
               "shape: each a table with task, schedule (seconds, a five-field crontab string, "
               "or a table of crontab fields, {every = ...} or {at = ...}), and optionally args, "
               "kwargs, options, queue, expires, timezone, catch_up, enabled. Added to the "
               "entries declared in code; a changed settings file is picked up without a "
               "restart.", keep_case=True),
        Option("timezone", "str", "UTC", "The IANA time zone crontab and naive `at` times are "
               "read in, unless an entry names its own (Celery's `timezone`)."),
        Option("lease_timeout", "float", 5.0, "Seconds the leading replica's lease lasts "
               "without renewal: a leader that dies is replaced within this plus a third of it "
               "(it renews every third).", minimum=0.3, maximum=10.0),
        Option("catch_up", "str", "run_once", "What a leader does with ticks nobody published "
               "on time (the previous leader died, or every replica was down): run_once "
               "publishes the latest of them once, skip drops them. Per entry: catch_up.",
               choices=CATCH_UP),
        Option("late_after", "float", 2.0, "Seconds after its time a tick counts as late: "
               "counted in the late metric, and dropped by catch_up = skip.", minimum=0.0),
        Option("check_tasks", "bool", True, "Refuse at start-up an entry whose task the app does "
               "not register. Turn off for a beat that sends tasks only other code defines (they "
               "still dead-letter on a worker that does not know them)."),
        Option("reload_interval", "float", 5.0, "Seconds between checks of the settings file "
               "for changed entries; 0 turns reloading off.", minimum=0.0),
        Option("source", "str", "", "A schedule source to take entries from as well, by name: "
               "django reads millpond-django's database schedule (editable in the Django admin). "
               "Polled for changes every reload_interval; empty: settings and code only."),
        Option("key_prefix", "str", "millpond.beat", "Prefix of the claim and state keys in the "
               "broker: two schedulers with different prefixes do not see each other."),
    ),
    hints={
        "max_loop_interval": "millpond beat sleeps until the next tick or lease renewal; there "
        "is nothing to tune",
        "scheduler": "the schedule lives in settings and code; its state is kept in the broker",
        "schedule_filename": "state is kept in the broker, not in a file",
    },
)  # fmt: skip
