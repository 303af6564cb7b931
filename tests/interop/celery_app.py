"""The Celery side of the interop suite: the same task names as `millpond_app`, run by
`celery -A tests.interop.celery_app worker` (configured from INTEROP_* variables) and sent by the
tests from apps made with `make_app`."""

from __future__ import annotations

import json
import os
from typing import Any

from celery import Celery

from tests.interop import sink
from tests.interop.errors import InteropError

SIDE = "celery"


def make_app(
    broker: str,
    backend: str,
    queue: str,
    transport_options: dict[str, Any] | None = None,
    control_exchange: str | None = None,
) -> Celery:
    app = Celery("interop", broker=broker, backend=backend)
    # a namespace of its own keeps one suite's control commands (shutdown!) from other workers
    app.conf.control_exchange = control_exchange or os.environ.get(
        "INTEROP_CONTROL_EXCHANGE", "celery"
    )
    app.conf.update(
        broker_transport_options=transport_options or {},
        task_default_queue=queue,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # a busy machine can drop a connection for a moment: publishing rides through that, as
        # millpond's own publish retries do
        task_publish_retry_policy={
            "max_retries": 40,
            "interval_start": 0,
            "interval_step": 0.25,
            "interval_max": 0.5,
        },
    )

    @app.task(name="interop.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="interop.tsum", shared=False)
    def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="interop.boom", shared=False)
    def boom(x: Any) -> None:
        raise ValueError(f"boom {x}")

    @app.task(name="interop.fail_custom", shared=False)
    def fail_custom(message: str) -> None:
        raise InteropError(message)

    @app.task(name="interop.record", shared=False)
    def record(value: Any, key: str) -> Any:
        sink.record(key, side=SIDE, value=value)
        return value

    @app.task(name="interop.on_error", shared=False)
    def on_error(request: Any, exc: BaseException, traceback: Any, key: str) -> None:
        sink.record(
            key, side=SIDE, kind="request", task_id=request.id,
            exc_type=type(exc).__name__, message=str(exc),
        )  # fmt: skip

    @app.task(name="interop.on_error_id", shared=False)
    def on_error_id(task_id: str, key: str) -> None:
        sink.record(key, side=SIDE, kind="task_id", task_id=task_id)

    @app.task(name="interop.gate", shared=False)
    def gate(key: str, value: Any) -> Any:
        if sink.client().blpop([key], timeout=60) is None:
            raise TimeoutError(f"gate {key} was never opened")
        return value

    return app


#: the worker's app
app = make_app(
    os.environ.get("INTEROP_BROKER", "redis://127.0.0.1:6379/0"),
    os.environ.get("INTEROP_BACKEND", "redis://127.0.0.1:6379/0"),
    os.environ.get("INTEROP_QUEUE", "celery"),
    json.loads(os.environ.get("INTEROP_TRANSPORT_OPTIONS", "{}")),
)
