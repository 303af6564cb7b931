"""`django-db://`: task results in the project's own database, through the Django ORM.

    MILLPOND = {"result_backend": "django-db://"}           # the `default` database
    MILLPOND = {"result_backend": "django-db://results"}    # the `results` alias of DATABASES

One `TaskResult` row per task (migration `millpond_django.0001`), written by the worker and read
by any process with the project's settings (a view calling `.get()`, the admin, a report query).
The columns hold Celery's result layout: status (millpond's `TaskState` values), result (the
return value, or Celery's exception dict), traceback, date_done, task name; `meta` keeps the
rest (retries, children, the worker's date_done text) so a stored result reads back exactly.

Waiting: a waiter in the storing process is woken at once (a condition); one in another process
polls the row with a back-off from 5 ms to `poll_max` seconds (0.1 by default): a database has no
portable notification, and one indexed read every 100 ms per waiting caller is what a `.get()`
costs. Expired rows (`result_expires` after their newest store; 0 keeps them) are never
returned, and a storing process deletes them in one statement at most once a minute. Chords and
saved groups are not supported (use the Redis or Postgres backend for those).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

from millpond.config.options import Section, declared, setting
from millpond.contracts.backend import ResultBackend, ResultMeta
from millpond.exceptions import BackendError, ConfigurationError
from millpond.states import READY_STATES, TaskState
from millpond_django.connections import fresh_connection, require_app

SCHEME = "django-db"
_EXPIRE_EVERY = 60.0
_POLL_MIN = 0.005


#: the `[django_db]` settings section, published under the `django-db` scheme: options from
#: settings (`MILLPOND_DJANGO_DB__RESULT_EXPIRES`), the URL's query or an options mapping
@dataclass(frozen=True)
class DjangoDbSettings:
    """The [django_db] section: each field declares one setting (`SECTION` is derived from them)."""

    result_expires: float = setting(
        86400.0,
        "Seconds a stored result is kept in the TaskResult table; 0 keeps it for ever.",
        minimum=0.0,
    )
    poll_max: float = setting(
        0.1,
        "Longest pause, in seconds, between two reads of a result another process is waiting "
        "for (the back-off starts at 5 ms).",
        minimum=0.005,
        maximum=5.0,
    )


SECTION = Section(
    "django_db", "Django ORM result backend (millpond-django)", declared(DjangoDbSettings)
)


def _alias(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme.lower() != SCHEME:
        raise ConfigurationError(
            f"{url!r} is not a django-db:// URL; use django-db:// (the default database) or "
            "django-db://ALIAS (a database of settings.DATABASES)"
        )
    return unquote(parts.netloc or parts.path.strip("/")) or "default"


def _state(value: str) -> TaskState | str:
    try:
        return TaskState(value)
    except ValueError:
        return value  # a custom state a task set: kept as the text it is


def _parse_date(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


class DjangoResultBackend(ResultBackend):
    """Results as `millpond_django.TaskResult` rows in a database of the Django project."""

    def __init__(self, url: str = "django-db://", options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self.alias = _alias(url)
        values = SECTION.resolve(self.options, url=url, query=urlsplit(url).query)
        self.result_expires = float(values["result_expires"])
        self.poll_max = float(values["poll_max"])
        self._changed = threading.Condition()
        self._expired_at = 0.0
        self._checked = False

    def __repr__(self) -> str:
        return f"<DjangoResultBackend {self.alias}>"

    # -- the table -------------------------------------------------------------------------------
    def _model(self) -> Any:
        if not self._checked:
            require_app("the django-db:// result backend")
            from django.conf import settings

            if self.alias not in settings.DATABASES:
                raise ConfigurationError(
                    f"the result backend {self.url!r} names the database {self.alias!r}, which "
                    f"settings.DATABASES does not have (it has {', '.join(settings.DATABASES)})"
                )
            self._checked = True
        from millpond_django.models import TaskResult

        return TaskResult

    def _failed(self, what: str, exc: Exception) -> BackendError:
        from django.db import DatabaseError

        hint = ""
        if isinstance(exc, DatabaseError) and "taskresult" in str(exc).lower():
            hint = "; has `manage.py migrate millpond_django` been run on that database?"
        return BackendError(f"{what} in the {self.alias!r} database failed: {exc}{hint}")

    # -- the contract ----------------------------------------------------------------------------
    def store(self, meta: ResultMeta) -> None:
        model = self._model()
        json.dumps([meta.result, meta.children])  # not JSON: TypeError, before the database sees it
        status = str(meta.status)
        fields = {
            "task_name": meta.name,
            "status": status,
            "result": meta.result,
            "traceback": meta.traceback,
            "date_done": _parse_date(meta.date_done)
            or (datetime.now(UTC) if status in READY_STATES else None),
            "meta": {
                "retries": meta.retries,
                "children": meta.children,
                "date_done": meta.date_done,
            },
        }
        try:
            with fresh_connection(self.alias):
                self._upsert(model, meta.task_id, fields)
        except Exception as exc:
            raise self._failed(f"storing the result of task {meta.task_id}", exc) from exc
        with self._changed:
            self._changed.notify_all()
        self._expire(model)

    def _upsert(self, model: Any, task_id: str, fields: dict[str, Any]) -> None:
        """Update the row, else insert it, each one statement: no read-then-write transaction,
        which SQLite refuses at once ("database is locked") when two threads store together."""
        from django.db import IntegrityError, transaction

        rows = model.objects.using(self.alias)
        fields = {**fields, "date_stored": datetime.now(UTC)}
        if rows.filter(task_id=task_id).update(**fields):
            return
        try:
            with transaction.atomic(using=self.alias):  # a savepoint inside a caller's atomic
                rows.create(task_id=task_id, **fields)
        except IntegrityError:  # another process inserted it in between
            rows.filter(task_id=task_id).update(**fields)

    def _expire(self, model: Any) -> None:
        now = time.monotonic()
        if not self.result_expires or now - self._expired_at < _EXPIRE_EVERY:
            return
        self._expired_at = now
        try:
            with fresh_connection(self.alias):
                model.objects.using(self.alias).filter(date_stored__lt=self._cutoff()).delete()
        except Exception:
            pass

    def _cutoff(self) -> datetime:
        return datetime.now(UTC) - timedelta(seconds=self.result_expires)

    def _read(self, model: Any, task_id: str) -> ResultMeta | None:
        rows = model.objects.using(self.alias).filter(task_id=task_id)
        if self.result_expires:
            rows = rows.filter(date_stored__gte=self._cutoff())
        row = rows.first()
        if row is None:
            return None
        extra = row.meta if isinstance(row.meta, dict) else {}
        # as the worker wrote it; a row written by other code has only the column
        date_done = extra.get("date_done")
        if "date_done" not in extra and row.date_done is not None:
            date_done = row.date_done.isoformat()
        return ResultMeta(
            task_id=row.task_id,
            status=_state(row.status),
            result=row.result,
            traceback=row.traceback,
            date_done=date_done,
            name=row.task_name,
            retries=int(extra.get("retries") or 0),
            children=list(extra.get("children") or []),
        )

    def peek(self, task_id: str) -> ResultMeta | None:
        model = self._model()
        try:
            with fresh_connection(self.alias):
                return self._read(model, task_id)
        except Exception as exc:
            raise self._failed(f"reading the result of task {task_id}", exc) from exc

    def get(self, task_id: str, timeout: float | None) -> ResultMeta | None:
        model = self._model()
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        pause = _POLL_MIN
        try:
            with fresh_connection(self.alias):
                while True:
                    meta = self._read(model, task_id)
                    if meta is not None and meta.status in READY_STATES:
                        return meta
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        return meta
                    wait = pause if deadline is None else min(pause, deadline - now)
                    with self._changed:  # a store in this process wakes the wait at once
                        self._changed.wait(wait)
                    pause = min(pause * 2, self.poll_max)
        except BackendError:
            raise
        except Exception as exc:
            raise self._failed(f"waiting for the result of task {task_id}", exc) from exc

    def forget(self, task_id: str) -> None:
        model = self._model()
        try:
            with fresh_connection(self.alias):
                model.objects.using(self.alias).filter(task_id=task_id).delete()
        except Exception as exc:
            raise self._failed(f"forgetting the result of task {task_id}", exc) from exc
