"""The millpond app `millpond beat` runs for the interop test: the Celery config's schedule and
time zone handed over as they are."""

from __future__ import annotations

from millpond import Millpond
from tests.interop import beat_celeryconfig as celeryconfig
from tests.interop.millpond_app import register

app = register(
    Millpond(
        "beat-interop",
        beat={"schedule": celeryconfig.beat_schedule, "timezone": celeryconfig.timezone},
    )
)
