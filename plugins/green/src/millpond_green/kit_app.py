"""The app green-pool worker subprocesses run (`millpond worker -A millpond_green.kit_app:app`).

It imports neither gevent nor eventlet: the worker's bootstrap has patched the interpreter with
one of them before this module is imported, and the probes report which.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import structlog

from millpond import Millpond
from millpond.produce.task import current_request

app = Millpond("green")
log = structlog.get_logger("green")
#: user code logging through the standard library, as most libraries do
std = logging.getLogger("green.user")


@app.task
def probe() -> dict[str, Any]:
    """How the worker process is patched, and which Python threads are real OS threads."""
    here = threading.get_native_id()  # a green pool runs tasks in the main OS thread
    return {
        "patched_env": os.environ.get("MILLPOND_PATCHED"),
        "socket_module": socket.socket.__module__,
        "sleep_module": getattr(time.sleep, "__module__", None) or "",
        "threads": [
            {"name": t.name, "same_os_thread": getattr(t, "native_id", None) in (None, here)}
            for t in threading.enumerate()
        ],
    }


@app.task
def step(n: int, seconds: float) -> dict[str, Any]:
    """Log (structlog and stdlib), yield for `seconds`, log again: each line must carry this
    task's own context."""
    log.info("green step", n=n, phase="before")
    std.info("green stdlib step", extra={"n": n, "phase": "before"})
    time.sleep(seconds)
    log.info("green step", n=n, phase="after")
    std.info("green stdlib step", extra={"n": n, "phase": "after"})
    request = current_request()
    return {"n": n, "task_id": request.id if request else None}


@app.task
def hold(seconds: float) -> int:
    """Yield for `seconds` in short sleeps; returns how often this message was delivered."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    request = current_request()
    return request.delivery_count if request else 0


@app.task
def add(x: int, y: int) -> int:
    return x + y
