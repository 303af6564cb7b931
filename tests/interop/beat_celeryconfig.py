"""A Celery configuration module as a Celery project has it: `beat_schedule` with Celery's own
schedule objects. `celery -A proj beat` would run it; here `millpond beat` runs it unchanged
(`beat_app`). The queue and the sink key come from the environment so each test run has its own.
"""

from __future__ import annotations

import os
from datetime import timedelta

from celery.schedules import crontab

QUEUE = os.environ.get("BEAT_QUEUE", "celery")
KEY = os.environ.get("BEAT_KEY", "beat")

beat_schedule = {
    "Record Every Second": {
        "task": "interop.record",
        "schedule": timedelta(seconds=1),
        "args": ("tick", KEY),
        "options": {"queue": QUEUE, "expires": 30},
    },
    "record-every-minute": {
        "task": "interop.record",
        "schedule": crontab(minute="*"),
        "args": ("minute", KEY),
        "options": {"queue": QUEUE},
    },
    "new-year": {  # never due while a test runs; the catch-up test makes a past one owed
        "task": "interop.record",
        "schedule": crontab(minute=0, hour=0, day_of_month=1, month_of_year=1),
        "args": ("new-year", KEY),
        "options": {"queue": QUEUE, "expires": 60},
    },
    "nightly-report": {
        "task": "interop.add",
        "schedule": crontab(hour=2, minute=30, day_of_week="mon-fri"),
        "args": (1, 2),
    },
}
timezone = "Europe/Berlin"
