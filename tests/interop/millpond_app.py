"""The millpond side of the interop suite: the same task names as `celery_app`, run by
`millpond worker -A tests.interop.millpond_app:app` (configured from MILLPOND_* variables) and sent
by the tests from apps made with `make_app`."""

from __future__ import annotations

from typing import Any

from millpond import Millpond
from tests.interop import sink
from tests.interop.errors import InteropError

SIDE = "millpond"


def register(app: Millpond) -> Millpond:
    @app.task(name="interop.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="interop.tsum")
    def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="interop.boom")
    def boom(x: Any) -> None:
        raise ValueError(f"boom {x}")

    @app.task(name="interop.fail_custom")
    def fail_custom(message: str) -> None:
        raise InteropError(message)

    @app.task(name="interop.record")
    def record(value: Any, key: str) -> Any:
        """A callback: the parent's result comes first."""
        sink.record(key, side=SIDE, value=value)
        return value

    @app.task(name="interop.on_error")
    def on_error(request: Any, exc: BaseException, traceback: Any, key: str) -> None:
        """An errback called in the failing worker with (request, exc, traceback)."""
        sink.record(
            key, side=SIDE, kind="request", task_id=request.id,
            exc_type=type(exc).__name__, message=str(exc),
        )  # fmt: skip

    @app.task(name="interop.on_error_id")
    def on_error_id(task_id: str, key: str) -> None:
        """An errback sent as a task with the failed task's id."""
        sink.record(key, side=SIDE, kind="task_id", task_id=task_id)

    @app.task(name="interop.gate")
    def gate(key: str, value: Any) -> Any:
        """Returns `value` once the test pushes to `key` (so a test decides which part of a
        chord completes it); fails after 60 s without it."""
        if sink.client().blpop([key], timeout=60) is None:
            raise TimeoutError(f"gate {key} was never opened")
        return value

    return app


def make_app(**config: Any) -> Millpond:
    return register(Millpond("interop", **config))


#: the worker's app: broker, backend and queues come from the MILLPOND_* variables
app = register(Millpond("interop"))
