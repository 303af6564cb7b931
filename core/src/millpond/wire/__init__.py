"""Bytes <-> messages, no I/O: Celery's protocol v2, kombu's JSON envelope, signing."""
