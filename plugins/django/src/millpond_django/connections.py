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
