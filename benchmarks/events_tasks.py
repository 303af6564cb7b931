"""The tasks `benchmarks/events_overhead.py` drains, in a millpond app and a Celery app (each built
on first use, so neither worker imports the other framework).

    millpond worker -A benchmarks.events_tasks:app ...
    celery -A benchmarks.events_tasks:celery_app worker ...

`bench.noop` is the task measured. `bench.cpu_mark` starts and ends a drain: it reports the wall
clock and the worker process's CPU time (`time.process_time()`, every thread of the process, the
event sender's included) through the Redis side channel of `benchmarks.tasks`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from benchmarks.tasks import BROKER_URL_ENV, noop, side


def cpu_mark(key: str) -> None:
    mark = {"wall": time.time(), "cpu": time.process_time(), "pid": os.getpid()}
    side().rpush(key, json.dumps(mark))


BODIES: dict[str, Any] = {"bench.noop": noop, "bench.cpu_mark": cpu_mark}


def _millpond_app() -> Any:
    from millpond import Millpond

    millpond_app = Millpond("bench-events")
    for name, fn in BODIES.items():
        millpond_app.task(name=name, ignore_result=True)(fn)
    return millpond_app


def _celery_app() -> Any:
    from celery import Celery

    capp = Celery(
        "bench-events", broker=os.environ.get(BROKER_URL_ENV, "redis://127.0.0.1:6379/13")
    )
    capp.conf.update(
        task_ignore_result=True,
        worker_prefetch_multiplier=4,
        broker_connection_retry_on_startup=True,
        worker_redirect_stdouts=False,
    )
    for name, fn in BODIES.items():
        capp.task(name=name, ignore_result=True)(fn)
    return capp


_FACTORIES = {"app": _millpond_app, "celery_app": _celery_app}


def __getattr__(name: str) -> Any:
    factory = _FACTORIES.get(name)
    if factory is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = factory()
    globals()[name] = value
    return value
