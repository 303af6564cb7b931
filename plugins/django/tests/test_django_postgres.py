"""A prefork child and its parent's Postgres connection: the child must neither use it (two
processes on one socket) nor close it (that ends the parent's session), and open its own.

Run in a subprocess with the test project on a private Postgres: this directory's other tests
hold Django configured on sqlite for the whole session."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from millpond.testing.harness import WorkerProcess, sqlite_url, wait_until
from millpond.testing.servers import PostgresServer

HERE = Path(__file__).parent

FORK_CHECK = """
import os

import django

django.setup()
from django.db import connection

from millpond_django.connections import drop_inherited_connections


def backend_pid():
    with connection.cursor() as cursor:
        cursor.execute("select pg_backend_pid()")
        return cursor.fetchone()[0]


parent = backend_pid()
child = os.fork()
if child == 0:
    drop_inherited_connections()
    mine = backend_pid()
    connection.close()
    os._exit(0 if mine != parent else 3)
_, status = os.waitpid(child, 0)
assert os.waitstatus_to_exitcode(status) == 0, "the child used its parent's connection"
assert backend_pid() == parent, "the parent's session was replaced"
print("parent session intact")
"""


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_a_forked_child_leaves_its_parents_connection_alone(postgres: PostgresServer) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(HERE),
        "DJANGO_SETTINGS_MODULE": "djproj.settings",
        "DJPROJ_POSTGRES_PORT": str(postgres.port),
        "DJPROJ_POSTGRES_DB": postgres.database,
        "DJPROJ_POSTGRES_USER": postgres.user,
        "DJPROJ_POSTGRES_PASSWORD": postgres.password,
    }
    proc = subprocess.run(
        [sys.executable, "-c", FORK_CHECK], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "parent session intact" in proc.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_worker_tasks_write_to_postgres_and_leave_no_session(
    postgres: PostgresServer, django_project: Path, tmp_path: Path, pool: str
) -> None:
    """The test project on Postgres: a worker's tasks write their rows there, and once they are
    done no session of the worker is left open (CONN_MAX_AGE = 0)."""
    import psycopg
    from shop.tasks import write_note

    from millpond_django import DjangoMillpond

    env = {
        "PYTHONPATH": str(HERE),
        "DJANGO_SETTINGS_MODULE": "djproj.settings",
        "DJPROJ_POSTGRES_PORT": str(postgres.port),
        "DJPROJ_POSTGRES_DB": postgres.database,
        "DJPROJ_POSTGRES_USER": postgres.user,
        "DJPROJ_POSTGRES_PASSWORD": postgres.password,
        "DJPROJ_BROKER": sqlite_url(tmp_path),
        "MILLPOND_QUEUES": f"pg-{uuid.uuid4().hex[:10]}",
    }
    migrate = subprocess.run(
        [sys.executable, "-m", "django", "migrate", "--run-syncdb", "-v0"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrate.returncode == 0, migrate.stderr[-4000:]
    with psycopg.connect(postgres.url, autocommit=True) as db:
        db.execute("delete from shop_note")
        worker = WorkerProcess(["-A", "djproj.millpond:app", "-P", pool, "-c", "3"], env, tmp_path)
        try:
            worker.wait_ready()
            producer = DjangoMillpond(
                "pg-producer", broker_url=env["DJPROJ_BROKER"], default_queue=env["MILLPOND_QUEUES"]
            )
            note = producer.task(name="shop.write_note")(write_note.fn)
            total = 300
            for i in range(total):
                note.delay(f"pg {i}")

            def count(sql: str) -> int:
                row = db.execute(sql).fetchone()
                return int(row[0]) if row else 0

            wait_until(
                lambda: count("select count(*) from shop_note") == total,
                120,
                f"the worker to write {total} rows to Postgres",
            )
            others = (
                "select count(*) from pg_stat_activity where datname = current_database() "
                "and pid <> pg_backend_pid() and backend_type = 'client backend'"
            )
            wait_until(lambda: count(others) == 0, 10, "the worker to close its sessions")
            producer.close()
        finally:
            worker.stop()


PRODUCER = """
import os, sys

import django

django.setup()
from millpond_django import DjangoMillpond
from shop.tasks import write_note

app = DjangoMillpond(
    "pg-results", default_queue=os.environ["MILLPOND_QUEUES"], result_backend="django-db://"
)
note = app.task(name="shop.write_note")(write_note.fn)
sent = [note.delay(f"result {i}") for i in range(20)]
pks = [r.get(timeout=60) for r in sent]
assert all(isinstance(pk, int) for pk in pks), pks
assert {r.state for r in sent} == {"SUCCESS"}
print("got", len(pks))
"""

SCHEDULE = """
import sys

import django

django.setup()
from millpond_django.models import PeriodicTask

name, queue, enabled = sys.argv[1], sys.argv[2], sys.argv[3] == "on"
row, _ = PeriodicTask.objects.update_or_create(
    name=name, defaults={"task": "shop.write_note", "every": 1, "queue": queue, "enabled": enabled}
)
print(row.last_run_at)
"""


def _postgres_env(postgres: PostgresServer, tmp_path: Path) -> dict[str, str]:
    env = {
        "PYTHONPATH": str(HERE),
        "DJANGO_SETTINGS_MODULE": "djproj.settings",
        "DJPROJ_POSTGRES_PORT": str(postgres.port),
        "DJPROJ_POSTGRES_DB": postgres.database,
        "DJPROJ_POSTGRES_USER": postgres.user,
        "DJPROJ_POSTGRES_PASSWORD": postgres.password,
        "DJPROJ_BROKER": sqlite_url(tmp_path),
        "MILLPOND_QUEUES": f"pg-{uuid.uuid4().hex[:10]}",
    }
    _run([sys.executable, "-m", "django", "migrate", "--run-syncdb", "-v0"], env)
    return env


def _run(cmd: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(
        cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.e2e
def test_the_orm_result_backend_on_postgres(postgres: PostgresServer, tmp_path: Path) -> None:
    """A worker stores its results in Postgres through `django-db://`; a producer in another
    process `.get()`s them."""
    env = {**_postgres_env(postgres, tmp_path), "DJPROJ_RESULTS": "django-db://"}
    worker = WorkerProcess(["-A", "djproj.millpond:app", "-P", "threads", "-c", "3"], env, tmp_path)
    try:
        worker.wait_ready()
        assert "got 20" in _run([sys.executable, "-c", PRODUCER], env)
    finally:
        worker.stop()


@pytest.mark.e2e
def test_the_database_schedule_on_postgres(postgres: PostgresServer, tmp_path: Path) -> None:
    """A row written through the ORM to Postgres is ticked by `millpond beat`; disabled, it is
    dropped without a restart."""
    from processes import BeatProcess

    from millpond import Millpond

    env = _postgres_env(postgres, tmp_path)
    queue = f"pg-beat-{uuid.uuid4().hex[:8]}"
    _run([sys.executable, "-c", SCHEDULE, "pg-every-second", queue, "on"], env)
    observer = Millpond("pg-beat-observer", broker_url=env["DJPROJ_BROKER"])
    beat = BeatProcess(env, tmp_path)
    try:
        wait_until(
            lambda: beat.alive() and observer.broker.queue_length(queue) >= 2,
            60,
            "beat to tick the Postgres row twice",
        )
        ran = _run([sys.executable, "-c", SCHEDULE, "pg-every-second", queue, "off"], env)
        assert "None" not in ran, "beat records the row's last run"
        wait_until(
            lambda: beat.alive() and '"removed": ["pg-every-second"]' in beat.text(),
            30,
            "beat to drop the disabled row",
        )
    finally:
        beat.stop()
        observer.close()
