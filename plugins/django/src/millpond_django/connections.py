"""Database connections around tasks: what Django does around a request, the worker does
around a task.

Django opens a connection per thread on first use and closes it at the end of a request when it
is older than `CONN_MAX_AGE` or broken (`close_old_connections`, on the request signals). A
worker has no requests, so without this a connection lives as long as the worker thread: it
outlives a database restart (every later task fails with "server closed the connection") and
`CONN_MAX_AGE = 0` means nothing. These hooks call `close_old_connections` before and after each
task, in the thread or process that runs it (every pool runs `enter_task`/`exit_task` there).

A prefork child inherits its parent's open connections with the fork. Closing them in the child
would, on Postgres and MySQL, end the parent's session through the shared socket; using them
would interleave two processes on one socket. So the child drops them without closing: Django
opens fresh ones on first use, and the inherited objects are kept referenced (never finalized)
until the child leaves through `os._exit`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import close_old_connections, connections

from millpond.contracts.hooks import Hooks

#: connections a prefork child inherited and must neither use nor close (see the module docstring)
_inherited: list[Any] = []


class DjangoConnectionHooks(Hooks):
    """Closes old or broken Django database connections around every task."""

    order = 40  # before log context and the others: a task's hooks may query the database

    def enter_task(self, job: Any) -> None:
        close_old_connections()

    def exit_task(self, job: Any, token: Any, outcome: Any) -> None:
        close_old_connections()

    def process_started(self) -> None:
        drop_inherited_connections()


def drop_inherited_connections() -> None:
    """Forget, without closing, the connections this process inherited through fork."""
    for conn in connections.all(initialized_only=True):
        raw = conn.connection
        if raw is None:
            continue
        if conn.vendor == "sqlite":
            # a file handle of its own: closing it in the child touches nothing of the parent's
            conn.close()
            continue
        _inherited.append(raw)
        conn.connection = None
        conn.in_atomic_block = False
        conn.savepoint_ids = []
        conn.needs_rollback = False


def ensure_django() -> None:
    """Set Django up if nobody has yet (a worker or beat process whose app module did not call
    `autodiscover_tasks`); a clear error when there are no settings to set it up from."""
    import django
    from django.apps import apps
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    from millpond.exceptions import ConfigurationError

    if apps.ready:
        return
    try:
        settings.INSTALLED_APPS  # noqa: B018 - reading it is the check
    except ImproperlyConfigured as exc:
        raise ConfigurationError(
            f"Django settings are not configured: set DJANGO_SETTINGS_MODULE ({exc})"
        ) from exc
    django.setup()


def require_app(what: str) -> None:
    """Raise a clear error when `millpond_django` is not an installed app (its tables are not
    there): `what` names the feature that needs it."""
    from django.apps import apps

    from millpond.exceptions import ConfigurationError

    ensure_django()
    if not apps.is_installed("millpond_django"):
        raise ConfigurationError(
            f"{what} needs the Django app millpond_django: add 'millpond_django' to "
            "INSTALLED_APPS and run `manage.py migrate millpond_django`"
        )


@contextmanager
def fresh_connection(alias: str) -> Iterator[Any]:
    """The `alias` connection, checked the way Django checks it around a request: one that is
    broken or older than CONN_MAX_AGE is closed before (so a database restart costs one
    reconnect, not every later call) and after (so CONN_MAX_AGE = 0 leaves no idle session in a
    worker's long-lived threads). Inside a caller's `transaction.atomic()` it is left alone."""
    conn = connections[alias]
    if not conn.in_atomic_block:
        conn.close_if_unusable_or_obsolete()
    try:
        yield conn
    finally:
        if not conn.in_atomic_block:
            conn.close_if_unusable_or_obsolete()
