"""millpond for Django projects.

`DjangoMillpond` is a `Millpond` app that reads its settings from Django's `settings.MILLPOND`,
finds the tasks in the installed apps' `tasks.py` modules, sends tasks after the current
transaction commits (`delay_on_commit`), and closes the database connections a task leaves
behind. See docs/django.md.
"""

from millpond_django.app import DjangoMillpond, django_config
from millpond_django.connections import DjangoConnectionHooks
from millpond_django.task import DjangoTask

__all__ = ["DjangoConnectionHooks", "DjangoMillpond", "DjangoTask", "django_config"]
