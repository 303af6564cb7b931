"""Settings from settings.MILLPOND, task autodiscovery and delay_on_commit, in process."""

from __future__ import annotations

from pathlib import Path

import pytest

from millpond.exceptions import ConfigurationError


def test_settings_come_from_django_settings(django_project: Path, monkeypatch) -> None:
    from millpond_django import DjangoMillpond

    monkeypatch.delenv("MILLPOND_DEFAULT_QUEUE", raising=False)
    app = DjangoMillpond("t-settings")
    assert app.settings.default_queue == "from-django-settings"
    assert app.settings.broker_url == "memory://djproj"


def test_environment_wins_over_django_settings(django_project: Path, monkeypatch) -> None:
    from millpond_django import DjangoMillpond

    monkeypatch.setenv("MILLPOND_DEFAULT_QUEUE", "from-env")
    assert DjangoMillpond("t-env").settings.default_queue == "from-env"


def test_keywords_win_over_django_settings(django_project: Path, monkeypatch) -> None:
    from millpond_django import DjangoMillpond

    monkeypatch.delenv("MILLPOND_DEFAULT_QUEUE", raising=False)
    app = DjangoMillpond("t-kw", default_queue="from-code")
    assert app.settings.default_queue == "from-code"


def test_a_millpond_setting_that_is_not_a_dict_is_refused(django_project: Path) -> None:
    from django.test import override_settings

    from millpond_django import DjangoMillpond

    with (
        override_settings(MILLPOND=["broker_url"]),
        pytest.raises(ConfigurationError, match="must be a dict"),
    ):
        DjangoMillpond("t-bad")


def test_autodiscovery_imports_the_installed_apps_tasks(django_project: Path) -> None:
    from djproj.millpond import app

    assert {"shop.write_note", "shop.connection_id"} <= set(app.tasks)
    assert app.autodiscover_tasks() == ["shop.tasks"]


def _queue_size(app, queue: str) -> int:
    return int(app.broker.queue_length(queue))


@pytest.fixture
def shop_app(django_project: Path):
    from djproj.millpond import app

    app.broker.purge("from-django-settings")
    return app


def test_delay_on_commit_sends_once_after_the_commit(shop_app) -> None:
    from django.db import transaction
    from shop.tasks import write_note

    with transaction.atomic():
        write_note.delay_on_commit("kept")
        assert _queue_size(shop_app, "from-django-settings") == 0, "sent before the commit"
    assert _queue_size(shop_app, "from-django-settings") == 1


def test_delay_on_commit_sends_nothing_on_rollback(shop_app) -> None:
    from django.db import transaction
    from shop.tasks import write_note

    class Rollback(Exception):
        pass

    with pytest.raises(Rollback), transaction.atomic():
        write_note.delay_on_commit("dropped")
        raise Rollback
    assert _queue_size(shop_app, "from-django-settings") == 0


def test_delay_on_commit_outside_a_transaction_sends_at_once(shop_app) -> None:
    from shop.tasks import write_note

    write_note.apply_async_on_commit(("now",), queue="from-django-settings")
    assert _queue_size(shop_app, "from-django-settings") == 1


def _package(tmp_path: Path, monkeypatch, name: str, tasks: str, module: str = "tasks") -> None:
    """A package `name` outside INSTALLED_APPS with a `<module>.py` of this text, importable."""
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / name / f"{module}.py").write_text(tasks)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_autodiscovery_takes_celerys_packages_and_related_name(
    django_project: Path, tmp_path: Path, monkeypatch
) -> None:
    """Celery's forms, `autodiscover_tasks(lambda: settings.INSTALLED_APPS)`, a list of packages
    and `related_name=`: each imports those packages' modules (they imported nothing, silently:
    a worker started without the tasks)."""
    from djproj.millpond import app

    body = (
        "from djproj.millpond import app\n\n@app.task(name='{0}.job')\ndef job():\n    return 1\n"
    )
    _package(tmp_path, monkeypatch, "pkg_list", body.format("pkg_list"))
    _package(tmp_path, monkeypatch, "pkg_call", body.format("pkg_call"))
    _package(tmp_path, monkeypatch, "pkg_rel", body.format("pkg_rel"), module="jobs")
    assert app.autodiscover_tasks(["pkg_list", "shop"]) == ["pkg_list.tasks", "shop.tasks"]
    assert app.autodiscover_tasks(lambda: ["pkg_call"]) == ["pkg_call.tasks"]
    assert app.autodiscover_tasks(["pkg_rel"], related_name="jobs", force=True) == ["pkg_rel.jobs"]
    assert {"pkg_list.job", "pkg_call.job", "pkg_rel.job"} <= set(app.tasks)


def test_autodiscovery_refuses_a_celery_shared_task(
    django_project: Path, tmp_path: Path, monkeypatch
) -> None:
    """A tasks.py still on `@shared_task` registers with Celery, not millpond: the worker would
    start without it and drop its messages as unknown. Discovery refuses it, saying what to use."""
    from djproj.millpond import app

    body = "from celery import shared_task\n\n@shared_task\ndef legacy(x):\n    return x\n"
    _package(tmp_path, monkeypatch, "pkg_celery", body)
    with pytest.raises(ConfigurationError, match=r"pkg_celery\.tasks\.legacy.*@app\.task"):
        app.autodiscover_tasks(["pkg_celery"])


def test_celery_settings_without_a_millpond_dict_are_refused(django_project: Path) -> None:
    """settings.py still holding Celery's CELERY_* settings and no MILLPOND: they were ignored
    silently (the app ran on millpond's default broker); now refused, naming them."""
    from django.test import override_settings

    from millpond_django import DjangoMillpond

    with (
        override_settings(MILLPOND=None, CELERY_BROKER_URL="redis://127.0.0.1:6379/9"),
        pytest.raises(ConfigurationError, match=r"CELERY_BROKER_URL.*MILLPOND"),
    ):
        DjangoMillpond("t-celery-settings")
    with override_settings(MILLPOND={}, CELERY_BROKER_URL="redis://127.0.0.1:6379/9"):
        DjangoMillpond("t-both")  # a MILLPOND dict given: the project chose, CELERY_* is Celery's
