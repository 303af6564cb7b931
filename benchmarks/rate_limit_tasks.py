"""The rate-limit benchmark's tasks, under the same names in a millpond app and a Celery app, built
lazily so each worker imports only its own framework (see benchmarks/rate_limits.py).

Each task records when it started (its own clock) on a Redis list named by the run's queue, so the
harness measures the rate tasks actually started at, whichever framework ran them."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

_local = threading.local()


def _record(kind: str) -> None:
    client = getattr(_local, "client", None)
    if client is None:
        import redis

        client = _local.client = redis.Redis.from_url(os.environ["RLBENCH_SIDE"])
    client.rpush(f"rlbench:{os.environ['RLBENCH_QUEUE']}:{kind}", repr(time.time()))


def limited() -> None:
    _record("limited")


def free() -> None:
    _record("free")


def _rate() -> str:
    return os.environ.get("RLBENCH_RATE", "20/s")


def _millpond_app() -> Any:
    from millpond import Millpond

    app = Millpond("rlbench")
    app.task(name="rlbench.limited", rate_limit=_rate())(limited)
    app.task(name="rlbench.free")(free)
    return app


def _celery_app() -> Any:
    from celery import Celery

    capp = Celery("rlbench", broker=os.environ["RLBENCH_BROKER"])
    capp.conf.update(
        task_ignore_result=True,
        worker_prefetch_multiplier=4,
        broker_connection_retry_on_startup=True,
        worker_redirect_stdouts=False,
    )
    capp.task(name="rlbench.limited", rate_limit=_rate())(limited)
    capp.task(name="rlbench.free")(free)
    return capp


_FACTORIES = {"app": _millpond_app, "celery_app": _celery_app}


def __getattr__(name: str) -> Any:
    factory = _FACTORIES.get(name)
    if factory is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = factory()
    globals()[name] = value
    return value
