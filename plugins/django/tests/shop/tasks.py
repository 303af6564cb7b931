"""Found by `app.autodiscover_tasks()`: nothing imports this module by name."""

import os

from django.db import connection
from djproj.millpond import app

from shop.models import Note


@app.task(name="shop.write_note")
def write_note(text: str) -> int:
    return Note.objects.create(text=text, pid=os.getpid()).pk


@app.task(name="shop.connection_id")
def connection_id() -> int:
    """The id of this task's database connection object's raw handle (0 when none is open)."""
    Note.objects.count()
    return id(connection.connection)


@app.task(name="shop.fail")
def fail(why: str) -> None:
    raise ValueError(why)
