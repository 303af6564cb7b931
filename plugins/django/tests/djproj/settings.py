"""Settings of the small Django project the millpond-django tests run: one app (`shop`), a
sqlite database whose file the test names through DJPROJ_DATABASE, and a MILLPOND dict."""

import os

SECRET_KEY = "millpond-django-tests"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "millpond_django",
    "shop",
]
ROOT_URLCONF = "djproj.urls"
ALLOWED_HOSTS = ["testserver"]  # the test client of test_django_beat.py
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
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
    # the database schedule, read again within half a second of an admin edit
    "beat": {"source": "django", "reload_interval": 0.5},
}
if os.environ.get("DJPROJ_RESULTS"):  # test_django_results.py: e.g. django-db://
    MILLPOND.update(result_backend=os.environ["DJPROJ_RESULTS"], ignore_result=False)
