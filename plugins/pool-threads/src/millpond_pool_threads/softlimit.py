"""Soft time limits for threads: raise `SoftTimeLimitExceeded` inside the thread running the task.

A thread cannot be interrupted from outside, but CPython can schedule an exception in another
thread (`PyThreadState_SetAsyncExc`): it is raised there at the next bytecode boundary. That makes
the limit best effort: a thread blocked inside one long C call (a `time.sleep(60)`, a socket read
without timeout, a regex) only sees it when that call returns. Tasks that wait in short steps or
run Python code see it at once.

The hard part is timing: the exception must land inside the task, never in the pool's own code.
Each thread has a `Slot`; the supervisor raises only while the slot holds the job whose limit
passed, under the slot's lock, and the thread, when the job ends, cancels a raise that is still
pending under the same lock. A raise that lands in the few bytecodes between the task's return and
that cancel is caught by the pool (see `ThreadPool._run_one`).
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import threading
import time

from millpond.contracts.pool import Job
from millpond.exceptions import SoftTimeLimitExceeded

__all__ = ["SUPPORTED", "Slot", "SoftLimitHit", "SoftLimits"]


class SoftLimitHit(SoftTimeLimitExceeded):
    """What the thread sees: a `SoftTimeLimitExceeded` with a message.

    CPython raises an async exception by instantiating its class with no arguments, so the class
    carries its own message. It presents itself as `millpond.exceptions.SoftTimeLimitExceeded`, so
    the stored failure names the type users catch and a caller rebuilds that same type.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(
            *(
                args
                or (
                    "the task ran past its soft time limit; catch SoftTimeLimitExceeded to "
                    "clean up, or raise the task's soft_time_limit",
                )
            )
        )


SoftLimitHit.__name__ = SoftLimitHit.__qualname__ = "SoftTimeLimitExceeded"
SoftLimitHit.__module__ = "millpond.exceptions"

try:
    _set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
        ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
    )
    _clear_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
        ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
    )
    SUPPORTED = True
except (AttributeError, OSError):  # not CPython: no way to interrupt a thread
    SUPPORTED = False


class Slot:
    """What one pool thread is running, guarded so a soft limit fires only into that job."""

    __slots__ = ("_lock", "fired", "ident", "job")

    def __init__(self, ident: int) -> None:
        self._lock = threading.Lock()
        self.ident = ident
        self.job: Job | None = None
        self.fired = False

    def begin(self, job: Job) -> None:
        with self._lock:
            self.job = job
            self.fired = False

    def end(self) -> None:
        """The job is over: cancel a raise that has not landed yet (called by the thread itself)."""
        with self._lock:
            if self.fired:
                _clear_async_exc(self.ident, None)
            self.job = None
            self.fired = False

    def fire(self, job: Job) -> bool:
        """Raise the soft limit in the thread if it is still running `job`; returns whether."""
        with self._lock:
            if self.job is not job or self.fired:
                return False
            self.fired = True
            return bool(_set_async_exc(self.ident, SoftLimitHit) == 1)


class SoftLimits:
    """One supervisor thread that fires each armed soft limit when its deadline passes.

    It starts on the first armed limit, so a pool whose tasks have no soft limit has no extra
    thread. Entries of jobs that ended stay in the heap until their deadline and are then dropped.
    """

    def __init__(self, name: str = "millpond-soft-limits") -> None:
        self._name = name
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Slot, Job]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def arm(self, slot: Slot, job: Job, seconds: float) -> None:
        with self._cond:
            if self._stopped:
                return
            heapq.heappush(self._heap, (time.monotonic() + seconds, next(self._seq), slot, job))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def stop(self, timeout: float = 1.0) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if not self._heap:
                        self._cond.wait()
                        continue
                    left = self._heap[0][0] - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._stopped:
                    return
                _, _, slot, job = heapq.heappop(self._heap)
            slot.fire(job)
