"""The canvas benchmark's tasks, under the same names in a millpond app and a Celery app, built
lazily so each worker imports only its own framework (see benchmarks/canvas.py)."""

from __future__ import annotations

import os
from typing import Any


def add(x: int, y: int) -> int:
    return x + y


def tsum(values: list[int]) -> int:
    return sum(values)


def _millpond_app() -> Any:
    from millpond import Millpond

    app = Millpond("cbench")
    app.task(name="cbench.add")(add)
    app.task(name="cbench.tsum")(tsum)
    return app


def _celery_app() -> Any:
    from celery import Celery

    capp = Celery(
        "cbench", broker=os.environ["CBENCH_BROKER"], backend=os.environ["CBENCH_RESULTS"]
    )
    capp.conf.update(
        # Celery routes a chain's later steps by the worker's default queue: the run's queue
        task_default_queue=os.environ["CBENCH_QUEUE"],
        worker_prefetch_multiplier=4,
        broker_connection_retry_on_startup=True,
        worker_redirect_stdouts=False,
    )
    capp.task(name="cbench.add")(add)
    capp.task(name="cbench.tsum")(tsum)
    return capp


_FACTORIES = {"app": _millpond_app, "celery_app": _celery_app}


def __getattr__(name: str) -> Any:
    factory = _FACTORIES.get(name)
    if factory is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = factory()
    globals()[name] = value
    return value
