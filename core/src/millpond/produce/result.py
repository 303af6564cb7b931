"""Result handles, and a task's error rebuilt for the caller as the same type only when that type
is a builtin or already imported (a message never makes us import a module), else as a `TaskError`
subclass named after it, so `except TaskError` catches all. `AsyncResult[R]` promises the task's
declared return type, unchecked against what the serializer gives back (JSON turns a tuple into a
list); `send_task` and `app.AsyncResult(id)`, which know no task, give `AsyncResult[Any]`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeAlias, TypeVar, cast, overload

from millpond import exceptions
from millpond.contracts.backend import ResultBackend, ResultMeta
from millpond.exceptions import BackendError, TaskError, TaskRevokedError
from millpond.states import READY_STATES, TaskState

if TYPE_CHECKING:
    from millpond.produce.app import Millpond
    from millpond_canvas import GroupResult

R_co = TypeVar("R_co", covariant=True)

#: millpond's exceptions that Celery has too, by the module Celery stores them under, so that a
#: stored failure rebuilds as Celery's own exception in a Celery client, as millpond's here
CELERY_MODULES = {
    name: module
    for module, names in [
        ("celery.exceptions", "TaskRevokedError MaxRetriesExceededError Reject Retry ChordError"),
        ("billiard.exceptions", "TimeLimitExceeded SoftTimeLimitExceeded WorkerLostError"),
    ]
    for name in names.split()
}


def error_info(exc_type: str, exc_module: str | None, message: list[Any]) -> dict[str, Any]:
    """A failure as stored: millpond's own exceptions under Celery's module where it has them."""
    own = not exc_module or exc_module == "millpond.exceptions"
    module = CELERY_MODULES.get(exc_type, "millpond.exceptions") if own else exc_module
    return {"exc_type": exc_type, "exc_module": module, "exc_message": message}


def rebuild_exception(info: Any) -> BaseException:
    """The exception a failed task raised, as close to the original as is safe."""
    if not isinstance(info, dict):
        return TaskError(str(info))
    name = str(info.get("exc_type") or "TaskError")
    module = str(info.get("exc_module") or "")
    raw_args = info.get("exc_message")
    args: list[Any] = list(raw_args) if isinstance(raw_args, list | tuple) else [raw_args]
    message = " ".join(str(a) for a in args)
    # Celery's revoke, time limit, ...: millpond's own; else only an imported module's (builtins)
    own = CELERY_MODULES.get(name) == module or module == "millpond.exceptions"
    cls = getattr(exceptions if own else sys.modules.get(module), name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        with suppress(Exception):  # its constructor takes other arguments: a TaskError below
            return cls(*args)
    return _remote_error(module, name)(f"{module}.{name}: {message}" if module else message)


@functools.cache
def _remote_error(module: str, name: str) -> type[TaskError]:
    """A `TaskError` subclass named after a remote type, one per type and process."""
    return type(name, (TaskError,), {"exc_type": name, "exc_module": module})


def require_backend(app: Millpond) -> ResultBackend:
    backend = app.backend
    if backend is None:
        raise BackendError(
            "no result backend is configured: set result_backend (MILLPOND_RESULT_BACKEND), "
            "or use a broker that stores results (sqlite, redis)"
        )
    return backend


@dataclass(unsafe_hash=True)  # equal and hashed by `id` alone
class AsyncResult(Generic[R_co]):
    """A handle on a sent task: its `id`, its state, and its outcome once ready. `R` is what
    `get()` returns, the task's result type (covariant: it is only returned)."""

    id: str
    app: Millpond = field(compare=False)
    #: the result of the step before this one in a chain (or a chord's header), when known
    parent: ResultNode | None = field(default=None, compare=False)
    _meta: ResultMeta | None = field(default=None, init=False, compare=False)

    def __repr__(self) -> str:
        return f"<AsyncResult {self.id}>"

    def __str__(self) -> str:
        return self.id  # as Celery's: code stores str(result) as the task id

    def as_tuple(self) -> list[Any]:
        """Celery's serialised form of a result (`[[id, parent], None]`), as stored in `children`."""
        return [[self.id, self.parent.as_tuple() if self.parent is not None else None], None]

    @property
    def children(self) -> list[ResultNode]:
        """The tasks this one sent while it ran and after (callbacks, the next chain step), as
        the worker stored them with its result; empty until it is ready."""
        return [result_from_tuple(item, self.app) for item in self._fetch().children or []]

    def collect(self, timeout: float | None = None) -> Iterator[tuple[ResultNode, Any]]:
        """This result and every one it led to (its children, theirs, ...), depth first, each
        with its value once ready: `for result, value in res.collect(): ...`."""
        stack: list[ResultNode] = [self]
        while stack:
            node = stack.pop()
            yield node, node.get(timeout=timeout)
            if isinstance(node, AsyncResult):
                stack.extend(reversed(node.children))

    def _fetch(self, wait: bool = False, timeout: float | None = None) -> ResultMeta:
        """The stored outcome (PENDING while none is), asked of the backend again until final;
        with `wait`, the backend waits up to `timeout` seconds for it to be final."""
        if self._meta is None or self._meta.status not in READY_STATES:
            backend = require_backend(self.app)
            stored = backend.get(self.id, timeout) if wait else backend.peek(self.id)
            self._meta = stored or ResultMeta(self.id, TaskState.PENDING)
        return self._meta

    @property
    def status(self) -> str:
        return self._fetch().status

    state = status

    def ready(self) -> bool:
        return self.status in READY_STATES

    def successful(self) -> bool:
        return self.status == TaskState.SUCCESS

    def failed(self) -> bool:
        return self.status == TaskState.FAILURE

    @property
    def result(self) -> Any:
        """The return value, or (as Celery's) the exception, not raised, of a task that failed, was
        revoked or will retry (None if none is stored). `Any`, not `R`: `get()` is the typed way."""
        meta = self._fetch()
        exc = meta.status in (TaskState.FAILURE, TaskState.RETRY, TaskState.REVOKED)
        return rebuild_exception(meta.result) if exc and meta.result else meta.result

    info = result

    @property
    def traceback(self) -> str | None:
        return self._fetch().traceback

    @overload
    def get(self, timeout: float | None = None, propagate: Literal[True] = True) -> R_co: ...

    @overload
    def get(self, timeout: float | None = None, propagate: bool = True) -> R_co | BaseException: ...

    def get(self, timeout: float | None = None, propagate: bool = True) -> R_co | BaseException:
        """Wait up to `timeout` seconds for the outcome (else `millpond.exceptions.TimeoutError`);
        a failure raises its error (type, message), or returns it unless `propagate` is True."""
        meta = self._fetch(wait=True, timeout=timeout)
        if meta.status not in READY_STATES:
            raise exceptions.TimeoutError(
                f"task {self.id} is not ready after {timeout}s (state {meta.status})"
            )
        if meta.status == TaskState.SUCCESS:
            return cast(R_co, meta.result)  # the return value, as the serializer gave it back
        if meta.status == TaskState.REVOKED and not isinstance(meta.result, dict):
            err: BaseException = TaskRevokedError(str(meta.result or f"task {self.id} was revoked"))
        else:
            err = rebuild_exception(meta.result)
        if propagate:
            raise err
        return err

    def forget(self) -> None:
        self._meta = None  # as Celery's: PENDING from now on, not the outcome read before
        if self.app.backend is not None:
            self.app.backend.forget(self.id)


#: a result handle: a task's, or a group's (the canvas plugin's `GroupResult`)
ResultNode: TypeAlias = "AsyncResult[Any] | GroupResult"


def result_from_tuple(value: Any, app: Millpond) -> ResultNode:
    """A result from Celery's serialised form: `[[id, parent], None]` for a task,
    `[[group_id, parent], [members...]]` for a group (made by the app's canvas)."""
    if isinstance(value, str):
        return AsyncResult(value, app)
    if hasattr(value, "as_tuple"):  # a result handle already
        return cast("ResultNode", value)
    try:
        (task_id, parent), members = value
    except (TypeError, ValueError):
        raise BackendError(f"not a stored result reference: {value!r:.200}") from None
    parent_node = result_from_tuple(parent, app) if parent else None
    if members is not None:
        results = [result_from_tuple(m, app) for m in members]
        return cast("GroupResult", app.canvas.group_result(str(task_id), results, parent_node))
    return AsyncResult(str(task_id), app, parent_node)
