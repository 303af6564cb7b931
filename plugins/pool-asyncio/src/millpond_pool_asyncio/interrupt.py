"""Best-effort interruption of a plain `def` task running in an executor thread.

A thread cannot be cancelled, but CPython can raise an exception in it asynchronously
(`PyThreadState_SetAsyncExc`): it fires at the next bytecode boundary, so a task blocked inside a
long C call (a socket read, `time.sleep(60)`) sees it only when that call returns. The pool uses
this for soft time limits (SoftTimeLimitExceeded, which the task may catch) and to free the thread
of a job it already reported as timed out or revoked.

An exception must never land after the job finished (it would hit the executor's own code), so
arming and disarming share a lock, and disarming clears anything still pending.
"""

from __future__ import annotations

import ctypes
import threading

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
_set_async_exc.restype = ctypes.c_int


class ThreadSlot:
    """The thread a sync job runs in, while it runs; `interrupt` raises into it only then."""

    __slots__ = ("_ident", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ident: int | None = None

    def arm(self) -> None:
        """Called by the executor thread just before it runs the job."""
        with self._lock:
            self._ident = threading.get_ident()

    def disarm(self) -> None:
        """Called by the executor thread when the job is over; clears a pending exception."""
        with self._lock:
            ident, self._ident = self._ident, None
            if ident is not None:
                _set_async_exc(ident, ctypes.py_object())  # NULL: drop anything pending

    def interrupt(self, exc_type: type[BaseException]) -> bool:
        """Raise `exc_type` in the job's thread if the job is still running there."""
        with self._lock:
            if self._ident is None:
                return False
            return bool(_set_async_exc(self._ident, ctypes.py_object(exc_type)) == 1)
