"""Result handles, and how a task's error comes back to the caller as the same exception type.

An exception is rebuilt from its stored type name and module only when that type is a builtin or
already imported in the caller's process: nothing is imported because a message says so. Anything
else becomes a `TaskError` subclass with the remote type's name, so `except TaskError` catches all.
"""

from __future__ import annotations

import builtins
import sys
import time
from typing import TYPE_CHECKING, Any

from millpond.broker import FAILURE, PENDING, READY_STATES, REVOKED, SUCCESS, ResultMeta
from millpond.exceptions import BackendError, TaskError, TaskRevokedError
from millpond.exceptions import TimeoutError as MillpondTimeoutError

if TYPE_CHECKING:
    from millpond.app import Millpond

_error_classes: dict[tuple[str, str], type[TaskError]] = {}


def exception_info(exc: BaseException) -> dict[str, Any]:
    """Celery's layout of a failure in the result store."""
    return {
        "exc_type": type(exc).__name__,
        "exc_module": type(exc).__module__,
        "exc_message": [str(exc)] if exc.args else [],
    }


def rebuild_exception(info: Any) -> BaseException:
    """The exception a failed task raised, as close to the original as is safe."""
    if not isinstance(info, dict):
        return TaskError(str(info))
    name = str(info.get("exc_type") or "TaskError")
    module = str(info.get("exc_module") or "")
    raw_args = info.get("exc_message")
    args: list[Any] = list(raw_args) if isinstance(raw_args, list | tuple) else [raw_args]
    message = " ".join(str(a) for a in args)
    cls: Any = None
    if module == "builtins":
        cls = getattr(builtins, name, None)
    elif module in sys.modules:
        cls = getattr(sys.modules[module], name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(*args)
        except Exception:
            pass
    key = (module, name)
    err_cls = _error_classes.get(key)
    if err_cls is None:
        err_cls = type(name, (TaskError,), {"exc_type": name, "exc_module": module})
        _error_classes[key] = err_cls
    return err_cls(f"{module}.{name}: {message}" if module else message)


class AsyncResult:
    """A handle on a sent task: its `id`, its state, and its outcome once ready."""

    def __init__(self, id: str, app: Millpond) -> None:
        self.id = id
        self.app = app
        self._meta: ResultMeta | None = None

    def __repr__(self) -> str:
        return f"<AsyncResult {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def _fetch(self) -> ResultMeta | None:
        if self._meta is not None and self._meta.status in READY_STATES:
            return self._meta
        backend = self.app.backend
        if backend is None:
            raise BackendError(
                "no result backend is configured: set result_backend (MILLPOND_RESULT_BACKEND), "
                "or use a broker that stores results (sqlite, redis)"
            )
        self._meta = backend.peek(self.id)
        return self._meta

    @property
    def status(self) -> str:
        meta = self._fetch()
        return meta.status if meta else PENDING

    state = status

    def ready(self) -> bool:
        return self.status in READY_STATES

    def successful(self) -> bool:
        return self.status == SUCCESS

    def failed(self) -> bool:
        return self.status == FAILURE

    @property
    def result(self) -> Any:
        """The return value, or the exception for a failed task (without raising it)."""
        meta = self._fetch()
        if meta is None:
            return None
        if meta.status == FAILURE:
            return rebuild_exception(meta.result)
        return meta.result

    @property
    def traceback(self) -> str | None:
        meta = self._fetch()
        return meta.traceback if meta else None

    def get(self, timeout: float | None = None, propagate: bool = True) -> Any:
        """Wait for the outcome. A failed task re-raises its error (type and message).

        Raises `millpond.exceptions.TimeoutError` when it is not ready within `timeout` seconds.
        """
        backend = self.app.backend
        if backend is None:
            self._fetch()  # raises the clear "no backend" error
        assert backend is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        meta = self._meta if self._meta and self._meta.status in READY_STATES else None
        while meta is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            got = backend.get(self.id, left)
            if got is not None and got.status in READY_STATES:
                meta = got
            elif deadline is not None and time.monotonic() >= deadline:
                state = got.status if got else PENDING
                raise MillpondTimeoutError(
                    f"task {self.id} is not ready after {timeout}s (state {state})"
                )
        self._meta = meta
        if meta.status == SUCCESS:
            return meta.result
        if meta.status == REVOKED:
            err: BaseException = TaskRevokedError(str(meta.result or f"task {self.id} was revoked"))
        else:
            err = rebuild_exception(meta.result)
        if propagate:
            raise err
        return err

    def forget(self) -> None:
        if self.app.backend is not None:
            self.app.backend.forget(self.id)
