"""The tasks the pool conformance kit runs, registered under `kit.*` names.

They live in an importable module (not inside a test) for two reasons: a prefork child or a green
pool's interpreter must find them by name, and a real worker
(`millpond worker -A millpond.testing.tasks:app`) must be able to run them in end-to-end tests.
Each one probes one thing a pool can get wrong: results and errors crossing back, true
parallelism (`gate`), context isolation (`context`, `pollute`), time limits (`sleep`,
`soft_cleanup`, `stubborn`), recycling (`allocate`, `whoami`) and dying units (`crash`).

Every waiting task waits in short steps: a soft limit delivered to a thread arrives only between
bytecodes, never inside one long blocking call, and the kit must not depend on that accident.
"""

from __future__ import annotations

import contextvars
import gc
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from millpond.exceptions import SoftTimeLimitExceeded
from millpond.produce.app import Millpond
from millpond.produce.task import current_request

__all__ = ["KIT_TASKS", "KitError", "app", "register"]

#: set by `pollute`; a later task on the same unit must see the default again
LEAK: contextvars.ContextVar[str | None] = contextvars.ContextVar("millpond_kit_leak", default=None)
#: memory `allocate` keeps, so the unit's resident size really grows
_HOARD: list[bytes] = []
#: the step waiting tasks sleep in (see the module docstring)
STEP = 0.005


class KitError(Exception):
    """The error `kit.fail` raises, so the kit can check type, module and message come back."""


def add(x: int, y: int) -> int:
    return x + y


def sleep(seconds: float) -> float:
    """Wait `seconds` in short steps; returns how long it waited."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        time.sleep(STEP)
    return time.monotonic() - started


def fail(message: str) -> None:
    raise KitError(message)


def context() -> dict[str, Any]:
    """What the task sees of its trace, log and request context, and where it runs."""
    from opentelemetry import trace

    span = trace.get_current_span()
    span_ctx = span.get_span_context()
    parent = getattr(span, "parent", None)
    request = current_request()
    return {
        "trace_id": format(span_ctx.trace_id, "032x") if span_ctx.is_valid else None,
        "span_id": format(span_ctx.span_id, "016x") if span_ctx.is_valid else None,
        "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
        "log": dict(structlog.contextvars.get_contextvars().items()),
        "request": None
        if request is None
        else {
            "id": request.id,
            "task": request.task,
            "retries": request.retries,
            "queue": request.queue,
            "args": list(request.args),
        },
        "leak": LEAK.get(),
        "pid": os.getpid(),
        "thread": threading.get_ident(),
    }


def pollute() -> dict[str, Any]:
    """Leave state behind in every context the task can reach; the next task must not see it."""
    structlog.contextvars.bind_contextvars(kit_leak="polluted", task_id="not-the-next-task")
    LEAK.set("polluted")
    return context()


def burn(seconds: float) -> int:
    """Keep a CPU busy for `seconds` in pure Python; returns the loop count."""
    deadline = time.perf_counter() + seconds
    count = 0
    while time.perf_counter() < deadline:
        count += 1
    return count


def work(iterations: int) -> int:
    """A fixed amount of CPU work (for benchmarks: the same work whatever the machine load)."""
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


def allocate(megabytes: int) -> float:
    """Grow the unit's resident memory by `megabytes` and keep it; returns the resident MB."""
    _HOARD.append(b"x" * (megabytes * 1024 * 1024))  # written bytes: resident, unlike calloc
    return resident_mb()


def resident_mb() -> float:
    """This process's resident set size in MiB (from /proc when there is one)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except OSError:
        import psutil

        return float(psutil.Process().memory_info().rss) / (1024 * 1024)


def soft_cleanup(seconds: float) -> str:
    """Wait for the soft time limit, catch it, clean up; "not interrupted" if it never came."""
    try:
        sleep(seconds)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "not interrupted"


def stubborn(seconds: float) -> float:
    """Ignore SIGTERM, then wait: only SIGKILL stops it (for the hard limit's escalation)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            time.sleep(STEP)
        except BaseException:  # noqa: S112 - swallowing what a pool raises into it is the point
            continue
    return seconds


def crash(code: int) -> None:
    """End the execution unit's process at once, as a segfault or an OOM kill would.

    Only for pools whose units are processes: in a thread it ends the test process.
    """
    os._exit(code)


def leave(code: int) -> None:
    """`sys.exit()` inside a task: a failure of the task, never the end of its unit."""
    sys.exit(code)


def log(message: str) -> str:
    """Log one line through structlog (the unit's log context must be bound)."""
    structlog.get_logger("millpond.kit").info(message)
    return message


def traced(x: int, y: int) -> int:
    """`add` inside a span of the task's own (`kit work`): it must be a child of the job's
    `process` span, whatever process runs it, and reach the exporter."""
    from opentelemetry import trace

    with trace.get_tracer("millpond.kit").start_as_current_span("kit work") as span:
        span.set_attribute("kit.pid", os.getpid())
        return x + y


def whoami() -> dict[str, int]:
    """Where the task ran, and how many objects the collector leaves alone there (`gc_frozen`: a
    prefork child inherits its fork server's frozen objects, whose pages then stay shared)."""
    return {"pid": os.getpid(), "thread": threading.get_ident(), "gc_frozen": gc.get_freeze_count()}


def unpicklable() -> Any:
    """A result no process boundary can carry."""
    return lambda: None


def gate(port: int, timeout: float = 30.0) -> str:
    """Check in at the kit's gate on `port` and wait until it opens.

    The gate (millpond.testing.pool_kit.Gate) counts arrivals and opens when told to, or when a
    given number of tasks are waiting at once: a rendezvous that works across threads, processes
    and greenlets alike, because it is a TCP socket.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"{os.getpid()}\n".encode())
        deadline = time.monotonic() + timeout
        sock.settimeout(0.05)  # short waits: a soft limit can land between them
        while True:
            try:
                data = sock.recv(1)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the kit's gate on port {port} did not open within {timeout:g}s: fewer "
                        "tasks than expected are running at once"
                    ) from None
                continue
            return "released" if data else "closed"


KIT_TASKS: dict[str, Callable[..., Any]] = {
    "kit.add": add,
    "kit.sleep": sleep,
    "kit.fail": fail,
    "kit.context": context,
    "kit.pollute": pollute,
    "kit.burn": burn,
    "kit.work": work,
    "kit.allocate": allocate,
    "kit.soft_cleanup": soft_cleanup,
    "kit.stubborn": stubborn,
    "kit.crash": crash,
    "kit.leave": leave,
    "kit.log": log,
    "kit.traced": traced,
    "kit.whoami": whoami,
    "kit.unpicklable": unpicklable,
    "kit.gate": gate,
}


def register(target: Millpond) -> Millpond:
    """Register every kit task on `target` (under its `kit.*` name); returns the app."""
    for name, fn in KIT_TASKS.items():
        if name not in target.tasks:
            target.task(name=name)(fn)
    return target


#: an app with the kit tasks; its broker comes from the settings (env, file, -b)
app = register(Millpond("millpond-kit"))
