"""`async def` tasks for the asyncio pool's tests (an importable module: worker subprocesses too).

Tasks that run on the pool's single event loop may share plain module state without locks; the
`peak` bookkeeping relies on that to measure how many coroutines really ran at once.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import structlog

from millpond.exceptions import SoftTimeLimitExceeded
from millpond.produce.app import Millpond
from millpond.produce.task import current_request

app = Millpond("asyncio-tests")

#: coroutines inside `nap` right now, and the most ever seen at once
RUNNING = {"now": 0, "peak": 0}
#: task ids whose coroutine started waiting, and those that then saw CancelledError
STARTED: list[str] = []
CANCELLED: list[str] = []


def reset() -> None:
    RUNNING.update(now=0, peak=0)
    STARTED.clear()
    CANCELLED.clear()


def _ids() -> dict[str, Any]:
    from opentelemetry import trace

    span = trace.get_current_span()
    ctx = span.get_span_context()
    parent = getattr(span, "parent", None)
    request = current_request()
    return {
        "trace_id": format(ctx.trace_id, "032x") if ctx.is_valid else None,
        "span_id": format(ctx.span_id, "016x") if ctx.is_valid else None,
        "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
        "log": dict(structlog.contextvars.get_contextvars()),
        "request_id": request.id if request else None,
    }


@app.task(name="aio.add")
async def add(x: int, y: int) -> int:
    await asyncio.sleep(0)
    return x + y


@app.task(name="aio.fail")
async def fail(message: str) -> None:
    await asyncio.sleep(0)
    raise LookupError(message)


@app.task(name="aio.nap")
async def nap(seconds: float) -> dict[str, Any]:
    """Sleep, counting how many naps overlap; report the context seen *after* the await."""
    RUNNING["now"] += 1
    RUNNING["peak"] = max(RUNNING["peak"], RUNNING["now"])
    try:
        await asyncio.sleep(seconds)
    finally:
        RUNNING["now"] -= 1
    return _ids()


@app.task(name="aio.bind_and_wait")
async def bind_and_wait(marker: str) -> dict[str, Any]:
    """Bind a log key, yield to every other coroutine, then report: nobody else's key is seen."""
    structlog.contextvars.bind_contextvars(marker=marker)
    for _ in range(5):
        await asyncio.sleep(0.001)
    return _ids()


@app.task(name="aio.soft_cleanup")
async def soft_cleanup(seconds: float) -> str:
    try:
        await asyncio.sleep(seconds)
    except SoftTimeLimitExceeded:
        await asyncio.sleep(0)  # cleaning up may await too
        return "cleaned up"
    return "not interrupted"


@app.task(name="aio.wait_for_cancel")
async def wait_for_cancel(seconds: float) -> str:
    request = current_request()
    STARTED.append(request.id if request else "?")
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        CANCELLED.append(request.id if request else "?")
        raise
    return "not cancelled"


@app.task(name="aio.stubborn")
async def stubborn(seconds: float) -> str:
    """Swallows cancellation (bad manners): it must keep its slot until it really ends."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            continue
    return "finished anyway"


@app.task(name="aio.retry", bind=True, max_retries=2)
async def retry(self: Any) -> None:
    await asyncio.sleep(0)
    raise self.retry(countdown=5)


@app.task(
    name="aio.autoretry",
    autoretry_for=(ConnectionError,),
    retry_backoff=False,
    default_retry_delay=7,
)
async def autoretry() -> None:
    raise ConnectionError("down")


@app.task(name="aio.plain")
def plain(x: int) -> dict[str, Any]:
    """A plain def task: runs in the executor, with the same context guarantees."""
    return {"value": x * 2, "pid": os.getpid(), **_ids()}


@app.task(name="aio.sync_interrupt")
def sync_interrupt() -> None:
    raise KeyboardInterrupt("raised by the plain def itself")


@app.task(name="aio.interrupt")
async def interrupt() -> None:
    raise KeyboardInterrupt("raised by the coroutine itself")
