"""Settings of the small Django project the millpond-django tests run: one app (`shop`), a
sqlite database whose file the test names through DJPROJ_DATABASE, and a MILLPOND dict."""

import os

SECRET_KEY = "millpond-django-tests"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
INSTALLED_APPS = ["django.contrib.contenttypes", "shop"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DJPROJ_DATABASE", ":memory:"),
        # the worker and the test process write one file: wait for the other's lock
        "OPTIONS": {"timeout": 20},
    }
}
if os.environ.get("DJPROJ_POSTGRES_PORT"):  # test_django_postgres.py: a private server
    DATABASES["default"] = {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": "127.0.0.1",
        "PORT": os.environ["DJPROJ_POSTGRES_PORT"],
        "NAME": os.environ["DJPROJ_POSTGRES_DB"],
        "USER": os.environ["DJPROJ_POSTGRES_USER"],
        "PASSWORD": os.environ["DJPROJ_POSTGRES_PASSWORD"],
    }
MILLPOND = {
    "broker_url": os.environ.get("DJPROJ_BROKER", "memory://djproj"),
    "default_queue": "from-django-settings",
    "ignore_result": True,
}
