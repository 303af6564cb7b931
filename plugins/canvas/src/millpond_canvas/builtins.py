"""The built-in tasks Celery's canvas sends, registered in every millpond app under Celery's names.

A Celery producer's `add.starmap(items)` is one message for the task `celery.starmap`,
`add.map(items)` one for `celery.map`, and `add.chunks(items, n)` in a chain or as a callback one
for `celery.chunks`; `celery.accumulate` collects a replaced group's results; `celery.chord_unlock`
joins a chord by polling, for result backends that cannot join one themselves. A worker that did
not know these names would dead-letter the messages as unknown tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from millpond.contracts.backend import ResultMeta
from millpond.exceptions import Retry, UnknownTask
from millpond.produce.result import error_info, result_from_tuple
from millpond.states import TaskState
from millpond_canvas.signatures import Signature, chunks

if TYPE_CHECKING:
    from millpond.produce.app import Millpond


def register_builtins(app: Millpond) -> None:
    def task_of(sig: Any) -> Any:
        signature = Signature.from_dict(sig, app)
        task = app.tasks.get(signature.name)
        if task is None:
            raise UnknownTask(
                f"task {signature.name!r} is not registered in this worker (called from "
                f"a map, starmap or chunks over it)"
            )
        return task

    @app.task(name="celery.map")
    def xmap(task: Any, it: Sequence[Any]) -> list[Any]:
        """`task(item)` for each item, here, in order."""
        run = task_of(task)
        return [run(item) for item in it]

    @app.task(name="celery.starmap")
    def xstarmap(task: Any, it: Sequence[Sequence[Any]]) -> list[Any]:
        """`task(*item)` for each item, here, in order."""
        run = task_of(task)
        return [run(*item) for item in it]

    @app.task(name="celery.chunks")
    def chunked(task: Any, it: Sequence[Any], n: int) -> list[Any]:
        """Send the items as a group of `celery.starmap` tasks of `n` items each."""
        group_result = chunks(Signature.from_dict(task, app), it, n, app=app).apply_async()
        return group_result.as_tuple()

    @app.task(name="celery.accumulate")
    def accumulate(*args: Any, **kwargs: Any) -> Any:
        index = kwargs.get("index")
        return args[index] if index is not None else list(args)

    @app.task(name="celery.chord_unlock", max_retries=None, default_retry_delay=1.0)
    def unlock_chord(
        group_id: str, callback: Any, *, interval: float | None = None,
        max_retries: int | None = None, result: Sequence[Any] = (), **kwargs: Any,
    ) -> None:  # fmt: skip
        """Poll the header's results; when all are ready, send the body with them (or fail it
        with a ChordError naming the first failed task)."""
        members = [result_from_tuple(r, app) for r in result]
        if not all(m.ready() for m in members):
            raise Retry(countdown=interval or 1.0, max_retries=max_retries)
        body = Signature.from_dict(callback, app)
        values = []
        for member in members:
            value = member.get(timeout=0, propagate=False)
            if isinstance(value, BaseException):
                fail_body(body, f"Dependency {member.id} raised {value!r}")
                return
            values.append(value)
        body.apply_async((values,))

    def fail_body(body: Signature[Any], reason: str) -> None:
        body_id = body.options.get("task_id")
        backend = app.backend
        if body_id and backend is not None:
            backend.store(
                ResultMeta(
                    task_id=body_id,
                    status=TaskState.FAILURE,
                    result=error_info("ChordError", "celery.exceptions", [reason]),
                    date_done=datetime.now(UTC).isoformat(),
                    name=body.name,
                )
            )
