"""`django-db://`: the result backend on the test project's database, held to the result part of
the broker kit, and end to end: a `millpond worker` subprocess stores what a producer `.get()`s.
(The same on Postgres: test_django_postgres.py.)"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from millpond.contracts.backend import ResultBackend, ResultMeta
from millpond.exceptions import ConfigurationError
from millpond.states import TaskState
from millpond.testing.broker_kit import BrokerContract
from millpond.testing.harness import WorkerProcess, sqlite_url

HERE = Path(__file__).parent


@pytest.fixture
def result_backend(django_project: Path) -> Iterator[ResultBackend]:
    from millpond.config import plugins

    backend = plugins.backend_for_url("django-db://")
    yield backend
    backend.close()


class TestDjangoResultContract:
    """The result guarantees of the broker kit (the kit's own tests, not copies)."""

    test_result_store_peek_get_forget = BrokerContract.test_result_store_peek_get_forget
    test_result_get_times_out = BrokerContract.test_result_get_times_out
    test_result_get_wakes_when_another_thread_stores = (
        BrokerContract.test_result_get_wakes_when_another_thread_stores
    )


def test_the_row_has_the_results_columns(result_backend: ResultBackend) -> None:
    """What the admin and a report query see: the state, result and task name in columns."""
    from millpond_django.models import TaskResult

    task_id = str(uuid.uuid4())
    result_backend.store(
        ResultMeta(task_id=task_id, status=TaskState.SUCCESS, result=[1, "a"], name="shop.x")
    )
    row = TaskResult.objects.get(task_id=task_id)
    assert (row.status, row.result, row.task_name) == ("SUCCESS", [1, "a"], "shop.x")
    assert row.date_done is not None, "a ready result gets its date_done"
    meta = result_backend.peek(task_id)
    assert meta is not None and meta.status is TaskState.SUCCESS


def test_expired_results_are_not_returned(django_project: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from millpond_django.models import TaskResult
    from millpond_django.results import DjangoResultBackend

    backend = DjangoResultBackend("django-db://?result_expires=60")
    task_id = str(uuid.uuid4())
    backend.store(ResultMeta(task_id=task_id, status=TaskState.SUCCESS))
    assert backend.peek(task_id) is not None
    stored = datetime.now(UTC) - timedelta(seconds=61)
    TaskResult.objects.filter(task_id=task_id).update(date_stored=stored)
    assert backend.peek(task_id) is None
    assert backend.get(task_id, 0.1) is None
    backend.forget(task_id)


def test_bad_input_is_refused_with_what_to_do(django_project: Path) -> None:
    from millpond_django.results import DjangoResultBackend

    with pytest.raises(ConfigurationError, match="DATABASES does not have"):
        DjangoResultBackend("django-db://nowhere").peek("x")
    with pytest.raises(ConfigurationError, match="result_expires"):
        DjangoResultBackend("django-db://?result_expires=-1")
    with pytest.raises(TypeError, match="not JSON serializable"):  # the worker stores why
        DjangoResultBackend().store(ResultMeta(task_id="x", status="SUCCESS", result=object()))


@pytest.mark.e2e
@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_worker_stores_results_a_producer_gets(
    django_project: Path, tmp_path: Path, pool: str
) -> None:
    from shop.models import Note
    from shop.tasks import fail, write_note

    from millpond_django import DjangoMillpond

    Note.objects.all().delete()
    queue = f"results-{uuid.uuid4().hex[:10]}"
    broker = sqlite_url(tmp_path)
    env = {
        "DJANGO_SETTINGS_MODULE": "djproj.settings",
        "DJPROJ_DATABASE": str(django_project),
        "DJPROJ_BROKER": broker,
        "DJPROJ_RESULTS": "django-db://",
        "MILLPOND_QUEUES": queue,
        "PYTHONPATH": str(HERE),
    }
    producer = DjangoMillpond(
        "results-producer", broker_url=broker, default_queue=queue, result_backend="django-db://"
    )
    note: Any = producer.task(name="shop.write_note")(write_note.fn)
    failing: Any = producer.task(name="shop.fail")(fail.fn)
    worker = WorkerProcess(["-A", "djproj.millpond:app", "-P", pool, "-c", "2"], env, tmp_path)
    try:
        worker.wait_ready()
        sent = [note.delay(f"result {i}") for i in range(20)]
        pks = [r.get(timeout=60) for r in sent]
        assert sorted(pks) == sorted(
            Note.objects.filter(text__startswith="result ").values_list("pk", flat=True)
        )
        assert {r.state for r in sent} == {TaskState.SUCCESS}
        broken = failing.delay("no")
        with pytest.raises(Exception, match="no") as caught:
            broken.get(timeout=60)
        assert type(caught.value).__name__ == "ValueError"
        assert broken.state is TaskState.FAILURE
    finally:
        worker.stop()
        producer.close()
