"""The Django flavour of the millpond app: settings from `settings.MILLPOND`, tasks found in the
installed apps, connection care around tasks.

`settings.MILLPOND` is given to the app as its code settings (what `Millpond(...)` keywords are),
so the documented precedence holds: `millpond.toml` < `settings.MILLPOND` (and keywords given
here, which win over it) < `MILLPOND_*` environment variables < command-line flags.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
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

    def autodiscover_tasks(self, module: str = "tasks") -> list[str]:
        """Import `<app>.tasks` of every installed Django app that has one (sets Django up first
        if needed); returns the modules imported. An error inside a `tasks.py` is raised, not
        skipped: a task module that does not import is a broken deployment."""
        import django
        from django.apps import apps

        if not apps.ready:
            django.setup()
        found = []
        for config in apps.get_app_configs():
            name = f"{config.name}.{module}"
            if importlib.util.find_spec(name) is None:
                continue
            importlib.import_module(name)
            found.append(name)
        return found
