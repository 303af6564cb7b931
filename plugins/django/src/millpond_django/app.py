"""The Django flavour of the millpond app: settings from `settings.MILLPOND`, tasks found in the
installed apps, connection care around tasks.

`settings.MILLPOND` is given to the app as its code settings (what `Millpond(...)` keywords are),
so the documented precedence holds: `millpond.toml` < `settings.MILLPOND` (and keywords given
here, which win over it) < `MILLPOND_*` environment variables < command-line flags.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, Unpack, overload

from millpond import Millpond
from millpond.exceptions import ConfigurationError
from millpond.produce.task import Task, TaskDecoratorOptions
from millpond_django.connections import DjangoConnectionHooks
from millpond_django.task import BoundDjangoTaskDecorator, DjangoTask

P = ParamSpec("P")
R = TypeVar("R")


def django_config() -> dict[str, Any]:
    """The `MILLPOND` dict of Django's settings (empty when there is none), checked for shape."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    try:
        config = getattr(settings, "MILLPOND", None)
    except ImproperlyConfigured as exc:
        raise ConfigurationError(
            "Django settings are not configured: set DJANGO_SETTINGS_MODULE (for example "
            "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'proj.settings')) before making "
            f"the millpond app ({exc})"
        ) from exc
    if config is None:
        celery = sorted(name for name in dir(settings) if name.startswith("CELERY_"))
        if celery:
            # Celery's `config_from_object('django.conf:settings', namespace='CELERY')` layout:
            # millpond does not read it, and running on its defaults instead would be silent
            raise ConfigurationError(
                f"settings.py has Celery's settings ({', '.join(celery[:5])}"
                f"{', ...' if len(celery) > 5 else ''}) but no MILLPOND dict: millpond reads "
                "only settings.MILLPOND, by the names of docs/settings.md (CELERY_BROKER_URL is "
                'MILLPOND = {"broker_url": ...}). Add MILLPOND (MILLPOND = {} to run on the '
                "defaults beside a Celery app that keeps CELERY_*)"
            )
        return {}
    if not isinstance(config, Mapping):
        raise ConfigurationError(
            f"settings.MILLPOND must be a dict of millpond settings, not {type(config).__name__}"
        )
    return {str(k).lower(): v for k, v in config.items()}


class DjangoMillpond(Millpond):
    """A millpond app for a Django project.

        # proj/millpond.py
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
        app = DjangoMillpond("proj")
        app.autodiscover_tasks()

    Keywords given here win over `settings.MILLPOND`; the environment wins over both.
    """

    task_cls = DjangoTask

    def __init__(self, name: str = "millpond", **config: Any) -> None:
        super().__init__(name, **{**django_config(), **config})
        self.add_hooks(DjangoConnectionHooks())

    # `Millpond.task`'s overloads with DjangoTask in place of Task, so that a type checker sees
    # `delay_on_commit` on the tasks (the implementation is Millpond's: `task_cls` makes them)
    @overload
    def task(
        self,
        fn: Callable[P, R],
        /,
        *,
        bind: Literal[False] = False,
        **options: Unpack[TaskDecoratorOptions],
    ) -> DjangoTask[P, R]: ...

    @overload
    def task(
        self,
        fn: Callable[Concatenate[Task[P, Any], P], R],
        /,
        *,
        bind: Literal[True],
        **options: Unpack[TaskDecoratorOptions],
    ) -> DjangoTask[P, R]: ...

    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        bind: Literal[False] = False,
        **options: Unpack[TaskDecoratorOptions],
    ) -> Callable[[Callable[P, R]], DjangoTask[P, R]]: ...

    @overload
    def task(
        self, fn: None = None, /, *, bind: Literal[True], **options: Unpack[TaskDecoratorOptions]
    ) -> BoundDjangoTaskDecorator: ...

    @overload
    def task(
        self, fn: None = None, /, *, bind: bool, **options: Unpack[TaskDecoratorOptions]
    ) -> Callable[[Callable[..., Any]], DjangoTask[..., Any]]: ...

    def task(
        self, fn: Callable[..., Any] | None = None, /, **options: Any
    ) -> Task[..., Any] | Callable[[Callable[..., Any]], Task[..., Any]]:
        """Register a function as a task (a `DjangoTask`); see `Millpond.task`."""
        return super().task(fn, **options)

    def autodiscover_tasks(
        self,
        packages: str | Iterable[str] | Callable[[], Iterable[str]] | None = None,
        related_name: str = "tasks",
        force: bool = False,
    ) -> list[str]:
        """Import `<package>.tasks` of every installed Django app that has one (sets Django up
        first if needed); returns the modules imported. An error inside a `tasks.py` is raised,
        not skipped: a task module that does not import is a broken deployment.

        Celery's forms are taken: `packages` a list of package names or a callable returning
        one (`lambda: settings.INSTALLED_APPS`), `related_name` the module to look for. A
        string alone is the module name (`autodiscover_tasks("jobs")` looks for `jobs.py`).
        `force` changes nothing: the modules are always imported at once. A module whose tasks
        are Celery's (`@shared_task`, a Celery app's `@task`) is refused: the worker would run
        without them."""
        import django
        from django.apps import apps

        del force
        if not apps.ready:
            django.setup()
        listed: Iterable[str] | None
        if isinstance(packages, str):
            listed, related_name = None, packages
        elif callable(packages):
            listed = packages()
        else:
            listed = packages
        if listed is None:
            names = [config.name for config in apps.get_app_configs()]
        else:
            names = [str(name) for name in listed]
        found = []
        for package in names:
            name = f"{package}.{related_name}"
            try:
                spec = importlib.util.find_spec(name)
            except ModuleNotFoundError as exc:
                if exc.name not in (package, name):
                    raise  # an import inside the package failed: not a missing package
                spec = None  # no such package (or a plain module): nothing to find
            if spec is None:
                continue
            _refuse_celery_tasks(importlib.import_module(name))
            found.append(name)
        return found


def _is_celery_task(value: Any) -> bool:
    """A Celery task object or `@shared_task` proxy (told apart without evaluating a proxy)."""
    kind = type(value)  # not `value.__class__`: a Celery proxy would evaluate itself
    if any(base.__module__.split(".")[0] == "celery" and base.__name__ == "Task"
           for base in kind.__mro__):  # fmt: skip
        return True
    if kind.__module__ != "celery.local":
        return False
    try:
        target = object.__getattribute__(value, "_Proxy__local")
    except AttributeError:
        return False
    # shared_task's proxy and an unfinalized Celery app's `@app.task`; not `current_app`
    return getattr(target, "__name__", "") in ("task_by_cons", "_task_from_fun")


def _refuse_celery_tasks(module: ModuleType) -> None:
    celery = [name for name, value in vars(module).items() if _is_celery_task(value)]
    if celery:
        names = ", ".join(f"{module.__name__}.{name}" for name in celery)
        raise ConfigurationError(
            f"{names} {'is a Celery task' if len(celery) == 1 else 'are Celery tasks'} "
            "(@shared_task or a Celery app's @task): millpond does not see it, so a worker would "
            "drop its messages as unknown. Decorate it with @app.task of your DjangoMillpond app "
            "(from proj.millpond import app) instead; see docs/django.md"
        )
