"""The project's millpond app, as docs/django.md tells a project to write it."""

import os

from millpond_django import DjangoMillpond

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djproj.settings")

app = DjangoMillpond("djproj")
app.autodiscover_tasks()
