"""The database beat schedule: `PeriodicTask` rows, edited in the Django admin, read by
`millpond beat` when its setting `beat.source` is `"django"`.

    MILLPOND = {"beat": {"source": "django", "reload_interval": 5}}

Beat reads the enabled rows at start-up, then asks every `beat.reload_interval` seconds for
`version()`: the change counter (bumped by every save and delete of a row), the number of rows
and their newest `date_changed`, one small query. When it differs the rows are read again, so an
admin edit takes effect within one interval, without a restart. After each published tick the
row's `last_run_at` and `total_run_count` are updated (a one-off row is disabled then), with an
`update()` that bumps no counter.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from datetime import UTC, datetime
from typing import Any

from django.db.models import Count, F, Max

from millpond.exceptions import ConfigurationError
from millpond_beat.sources import ScheduleSource
from millpond_django.connections import fresh_connection, require_app


class DjangoSchedule(ScheduleSource):
    """The `PeriodicTask` rows of the project's default database, as beat entries."""

    label = "django"
    alias = "default"

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        require_app("beat.source = 'django'")

    def version(self) -> Hashable:
        from millpond_django.models import PeriodicTask, ScheduleChange

        with fresh_connection(self.alias):
            counter = (
                ScheduleChange.objects.using(self.alias)
                .filter(ident=1)
                .values_list("counter", flat=True)
                .first()
            )
            rows = PeriodicTask.objects.using(self.alias).aggregate(
                n=Count("id"), newest=Max("date_changed")
            )
        return (counter, rows["n"], rows["newest"])

    def schedule(self) -> Mapping[str, Mapping[str, Any]]:
        from django.db import DatabaseError

        from millpond_django.models import PeriodicTask

        try:
            with fresh_connection(self.alias):
                rows = list(PeriodicTask.objects.using(self.alias).filter(enabled=True))
        except DatabaseError as exc:
            raise ConfigurationError(
                f"cannot read the periodic tasks from the {self.alias!r} database: {exc} (has "
                "`manage.py migrate millpond_django` been run there?)"
            ) from exc
        return {row.name: row.spec() for row in rows}

    def published(self, name: str, tick: float) -> None:
        from millpond_django.models import PeriodicTask

        when = datetime.fromtimestamp(tick, UTC)
        with fresh_connection(self.alias):
            rows = PeriodicTask.objects.using(self.alias).filter(name=name)
            rows.update(last_run_at=when, total_run_count=F("total_run_count") + 1)
            # a one-off ran: shown disabled in the admin (beat would not run it again anyway)
            rows.filter(kind="one_off").update(enabled=False)
