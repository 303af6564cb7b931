"""The Django test project (djproj + shop) set up once for this directory's tests.

Django's settings are process-wide: they are configured here, with the DJANGO_SETTINGS_MODULE
variable set only while Django reads it, so that tests elsewhere in the same run (Celery's
interop tests look for that variable) do not see a Django project.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


@pytest.fixture(scope="session")
def django_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Django set up on a fresh sqlite file with the tables made; yields the file's path."""
    import django
    from django.core.management import call_command

    database = tmp_path_factory.mktemp("djproj") / "db.sqlite3"
    saved = {k: os.environ.get(k) for k in ("DJANGO_SETTINGS_MODULE", "DJPROJ_DATABASE")}
    os.environ["DJANGO_SETTINGS_MODULE"] = "djproj.settings"
    os.environ["DJPROJ_DATABASE"] = str(database)
    try:
        django.setup()
        call_command("migrate", run_syncdb=True, verbosity=0)
        # the project's app module sets DJANGO_SETTINGS_MODULE by `setdefault`, as a project's
        # does: import it here, so that the variable is taken away again below
        import djproj.millpond  # noqa: F401
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return database
