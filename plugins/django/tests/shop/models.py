from django.db import models


class Note(models.Model):
    """A row a task writes, so a test can see the task ran against the project's database."""

    text = models.CharField(max_length=200)
    pid = models.IntegerField(default=0)

    class Meta:
        app_label = "shop"
