"""The Django app `millpond_django`: add it to INSTALLED_APPS for the database result backend
(`django-db://`) and the database beat schedule (`beat.source = "django"`), then `migrate`."""

from __future__ import annotations

from django.apps import AppConfig


class MillpondDjangoConfig(AppConfig):  # type: ignore[misc]
    name = "millpond_django"
    label = "millpond_django"
    verbose_name = "millpond"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from millpond_django import models

        models.connect_signals()
