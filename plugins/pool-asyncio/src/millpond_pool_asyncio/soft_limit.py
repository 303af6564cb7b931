"""The soft time limit of an `async def` task: SoftTimeLimitExceeded raised at its current `await`.

asyncio can only interrupt a coroutine by cancelling its task, and the coroutine then sees
CancelledError, which well-behaved code re-raises instead of handling. A soft limit must instead be
an ordinary exception the task can catch to clean up (as on prefork). So the task's coroutine is
driven through `SoftLimited`, a thin driver that forwards every send/throw unchanged, except the one
cancellation it caused itself: that one it withdraws (`Task.uncancel`) and replaces with
SoftTimeLimitExceeded, thrown into the coroutine exactly where it was waiting. A cancellation from
anyone else (the hard limit, terminate_job, shutdown) still arrives as CancelledError.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any

from millpond.exceptions import SoftTimeLimitExceeded


class SoftLimited:
    """Awaitable running `coro` with a soft limit of `seconds` (awaited once, in a task)."""

    __slots__ = ("_coro", "_message", "_seconds")

    def __init__(self, coro: Coroutine[Any, Any, Any], seconds: float, message: str) -> None:
        self._coro = coro
        self._seconds = seconds
        self._message = message

    def __await__(self) -> Generator[Any, Any, Any]:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - only ever awaited inside a task
            raise RuntimeError("SoftLimited must be awaited inside an asyncio task")
        coro = self._coro
        fired = False

        def fire() -> None:
            nonlocal fired
            fired = True
            task.cancel()

        timer = asyncio.get_running_loop().call_later(self._seconds, fire)
        send: Any = None
        throw: BaseException | None = None
        try:
            while True:
                try:
                    if throw is not None:
                        exc, throw = throw, None
                        step = coro.throw(exc)
                    else:
                        step = coro.send(send)
                except StopIteration as stop:
                    return stop.value
                try:
                    send = yield step
                except asyncio.CancelledError as exc:
                    # Only ours, and nobody else's pending with it: translate it.
                    if fired and task.cancelling() == 1:
                        fired = False
                        task.uncancel()
                        throw = SoftTimeLimitExceeded(self._message)
                    else:
                        throw = exc
                except GeneratorExit:
                    coro.close()
                    raise
                except BaseException as exc:
                    throw = exc
        finally:
            timer.cancel()
