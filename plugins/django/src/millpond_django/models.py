"""The tables of `millpond_django`: task results (`django-db://`) and the beat schedule.

These are millpond's own tables (`millpond_django_taskresult`, `millpond_django_periodictask`,
`millpond_django_schedulechange`), not django-celery-results' or django-celery-beat's: the shapes
differ (one periodic-task table with the schedule in its columns instead of one table per
schedule kind), so a project moving over copies its rows once (see docs/django.md).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, models, transaction
from django.db.models.signals import post_delete, post_save
from django.utils.timezone import now

from millpond.states import TaskState

STATES = [(state.value, state.value) for state in TaskState]


class TaskResult(models.Model):  # type: ignore[misc]
    """One task's stored outcome, the result backend's row (Celery's result layout in columns)."""

    task_id = models.CharField(max_length=255, unique=True)
    task_name = models.CharField(max_length=255, null=True, blank=True, db_index=True)
    status = models.CharField(max_length=50, choices=STATES, default=TaskState.PENDING.value)
    #: the return value, or Celery's {"exc_type", "exc_message", "exc_module"} for a failure
    result = models.JSONField(null=True, blank=True)
    traceback = models.TextField(null=True, blank=True)
    date_done = models.DateTimeField(null=True, blank=True)
    #: when the newest state was stored: what `result_expires` counts from
    date_stored = models.DateTimeField(auto_now=True, db_index=True)
    #: the rest of the stored document (retries, children, date_done as the worker wrote it)
    meta = models.JSONField(default=dict, blank=True)

    class Meta:
        verbose_name = "task result"
        ordering = ["-date_done"]

    def __str__(self) -> str:
        return f"{self.task_name or '?'} {self.task_id} {self.status}"


KINDS = [("interval", "every N seconds"), ("crontab", "crontab"), ("one_off", "once, at a time")]


class PeriodicTask(models.Model):  # type: ignore[misc]
    """One beat entry, edited in the admin; read by `millpond beat` with `beat.source = "django"`.

    Every edit through the ORM or the admin (save, delete) bumps the change counter that beat
    polls, so it takes effect within `beat.reload_interval` seconds. A bulk `QuerySet.update()`
    sends no signals: call `schedule_changed()` after one."""

    name = models.CharField(max_length=200, unique=True)
    task = models.CharField(max_length=255, help_text="the registered task name, e.g. shop.report")
    kind = models.CharField(max_length=10, choices=KINDS, default="interval")
    every = models.FloatField(null=True, blank=True, help_text="seconds, for an interval")
    crontab = models.CharField(
        max_length=200, blank=True, help_text="five fields, e.g. '*/5 * * * *', for a crontab"
    )
    run_at = models.DateTimeField(null=True, blank=True, help_text="when, for a one-off")
    timezone = models.CharField(
        max_length=64, blank=True, help_text="IANA zone for the crontab (empty: beat.timezone)"
    )
    args = models.JSONField(default=list, blank=True, help_text="a JSON list")
    kwargs = models.JSONField(default=dict, blank=True, help_text="a JSON object")
    queue = models.CharField(max_length=200, blank=True, help_text="empty: the task's own queue")
    expires = models.FloatField(
        null=True, blank=True, help_text="seconds after its tick a message expires"
    )
    enabled = models.BooleanField(default=True)
    last_run_at = models.DateTimeField(null=True, blank=True, editable=False)
    total_run_count = models.PositiveIntegerField(default=0, editable=False)
    date_changed = models.DateTimeField(auto_now=True)
    description = models.TextField(blank=True)

    class Meta:
        verbose_name = "periodic task"
        ordering = ["name"]

    def __str__(self) -> str:
        return str(self.name)

    def spec(self) -> dict[str, Any]:
        """The entry in Celery's beat_schedule shape, as the `beat.schedule` setting takes it."""
        spec: dict[str, Any] = {"task": self.task, "args": list(self.args or [])}
        spec["kwargs"] = dict(self.kwargs or {})
        if self.kind == "interval":
            spec["schedule"] = {"every": self.every}
        elif self.kind == "crontab":
            spec["schedule"] = self.crontab
        else:
            spec["at"] = self.run_at
        if self.timezone:
            spec["timezone"] = self.timezone
        if self.queue:
            spec["queue"] = self.queue
        if self.expires is not None:
            spec["expires"] = self.expires
        return spec

    def clean(self) -> None:
        """What beat would refuse, refused in the form already (needs millpond-beat)."""
        needed = {"interval": "every", "crontab": "crontab", "one_off": "run_at"}[self.kind]
        if getattr(self, needed) in (None, ""):
            raise ValidationError({needed: f"a {self.get_kind_display()} schedule needs this"})
        if not isinstance(self.args, list):
            raise ValidationError({"args": "args must be a JSON list, e.g. [1, 2]"})
        if not isinstance(self.kwargs, dict):
            raise ValidationError({"kwargs": 'kwargs must be a JSON object, e.g. {"x": 1}'})
        try:
            from millpond_beat.entries import check_entry
        except ImportError:
            return
        try:
            check_entry(self.name or "entry", self.spec())
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


class ScheduleChange(models.Model):  # type: ignore[misc]
    """One row: a counter bumped on every change of the schedule, what beat polls (the role of
    django-celery-beat's `PeriodicTasks.last_update`)."""

    ident = models.PositiveSmallIntegerField(primary_key=True, default=1)
    counter = models.BigIntegerField(default=0)
    last_update = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "schedule change"


def schedule_changed(using: str | None = None) -> None:
    """Tell beat the schedule changed (done for you on every save and delete of a PeriodicTask;
    call it after a `QuerySet.update()` or a raw SQL change)."""
    # one UPDATE statement, else the first row: no read-then-write transaction, which SQLite
    # refuses at once ("database is locked") when two processes do it together
    rows = ScheduleChange.objects.using(using)
    bump = {"counter": models.F("counter") + 1, "last_update": now()}
    if rows.filter(ident=1).update(**bump):
        return
    try:
        with transaction.atomic(using=using):
            rows.create(ident=1, counter=1)
    except IntegrityError:  # another process made it in between
        rows.filter(ident=1).update(**bump)


def _on_change(sender: Any, instance: Any, using: str | None = None, **_: Any) -> None:
    schedule_changed(using)


def connect_signals() -> None:
    post_save.connect(_on_change, sender=PeriodicTask, dispatch_uid="millpond_schedule_save")
    post_delete.connect(_on_change, sender=PeriodicTask, dispatch_uid="millpond_schedule_delete")
