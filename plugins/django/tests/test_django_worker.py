"""`millpond worker -A djproj.millpond:app` as a subprocess on the embedded sqlite broker: the
autodiscovered tasks write rows to the project's database, delay_on_commit publishes only what
was committed, and no pool keeps database connections open between tasks."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from millpond.testing.harness import WorkerProcess, assert_clean_stderr, sqlite_url, wait_until

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent


@pytest.fixture
def world(django_project: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A fresh broker and queue, the worker's environment, and an app sending to them."""
    from shop.models import Note

    from millpond_django import DjangoMillpond

    Note.objects.all().delete()
    queue = f"django-{uuid.uuid4().hex[:10]}"
    broker = sqlite_url(tmp_path)
    env = {
        "DJANGO_SETTINGS_MODULE": "djproj.settings",
        "DJPROJ_DATABASE": str(django_project),
        "DJPROJ_BROKER": broker,
        "MILLPOND_QUEUES": queue,
        "PYTHONPATH": str(HERE),
        "MILLPOND_SHUTDOWN_TIMEOUT": "20",
    }
    producer = DjangoMillpond("producer", broker_url=broker, default_queue=queue)
    started: list[WorkerProcess] = []

    def spawn(*args: str) -> WorkerProcess:
        worker = WorkerProcess(
            ["-A", "djproj.millpond:app", *args], env, tmp_path, name=f"w{len(started)}"
        )
        started.append(worker)
        return worker.wait_ready()

    yield {"queue": queue, "app": producer, "spawn": spawn}
    for worker in started:
        worker.stop()
    producer.close()


def _write_note(app: Any) -> Any:
    from shop.tasks import write_note

    # the producer's handle on the worker's task: same name, sent through the producer's broker
    return app.task(name="shop.write_note")(write_note.fn)


def test_the_worker_runs_autodiscovered_tasks_against_the_database(world) -> None:
    from shop.models import Note

    worker = world["spawn"]("-P", "threads", "-c", "2")
    note = _write_note(world["app"])
    for i in range(5):
        note.delay(f"note {i}")
    wait_until(lambda: Note.objects.count() == 5, 30, "the worker to write 5 notes")
    assert {n.pid for n in Note.objects.all()} == {worker.pid}
    worker.stop()
    assert_clean_stderr(worker)


def test_delay_on_commit_publishes_only_committed_work(world) -> None:
    from django.db import transaction
    from shop.models import Note

    class Rollback(Exception):
        pass

    world["spawn"]("-P", "threads")
    note = _write_note(world["app"])
    with pytest.raises(Rollback), transaction.atomic():
        note.delay_on_commit("rolled back")
        raise Rollback
    assert world["app"].broker.queue_length(world["queue"]) == 0
    with transaction.atomic():
        note.delay_on_commit("committed")
    wait_until(lambda: Note.objects.count() == 1, 30, "the worker to write the committed note")
    assert list(Note.objects.values_list("text", flat=True)) == ["committed"]


def _database_handles(pid: int, database: Path) -> int:
    """Open file handles on the project's database of `pid` and its children."""
    proc = psutil.Process(pid)
    count = 0
    for p in [proc, *proc.children(recursive=True)]:
        count += sum(1 for f in p.open_files() if Path(f.path) == database)
    return count


@pytest.mark.parametrize("pool", ["threads", "prefork", "gevent", "eventlet"])
def test_no_connection_outlives_its_task(world, django_project: Path, pool: str) -> None:
    """CONN_MAX_AGE is 0: Django would close each connection at the end of a request, and the
    worker does it at the end of each task, on every execution thread, child process and
    greenlet (the green workers are subprocesses: this session is not monkey-patched)."""
    from shop.models import Note

    total = 1000
    worker = world["spawn"]("-P", pool, "-c", "3")
    note = _write_note(world["app"])
    for i in range(total):
        note.delay(f"n{i}")
    wait_until(lambda: Note.objects.count() == total, 120, f"the worker to write {total} notes")
    # the last task's exit_task runs right after its row is written: wait for it, boundedly
    wait_until(
        lambda: _database_handles(worker.pid, django_project) == 0,
        10,
        "the worker to hold no database connection after its tasks",
    )
