"""The app the fault-injection suite runs in `millpond worker` subprocesses.

Every task writes its id to a ledger file under $FAULTS_DIR when its body has run (`done.log`),
and the slow ones also when they start (`started.log`). One small `os.write` on an `O_APPEND`
descriptor is atomic on a local file, so lines from many processes (prefork children, several
workers) never interleave, and a process killed with SIGKILL leaves either the whole line or none.
Counting lines per id is how a test tells lost tasks (no line) from duplicates (two or more).
"""

from __future__ import annotations

import os
import signal
import time

from millpond import Millpond

app = Millpond("faults")


def record(kind: str, task_id: str) -> None:
    directory = os.environ.get("FAULTS_DIR")
    if not directory:
        return
    fd = os.open(os.path.join(directory, f"{kind}.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{task_id}\n".encode())
    finally:
        os.close(fd)


@app.task(bind=True)
def noop(self) -> None:  # type: ignore[no-untyped-def]
    """A no-op whose completion is recorded: large task counts in little time."""
    record("done", self.request.id)


@app.task(bind=True)
def nap(self, seconds: float) -> float:  # type: ignore[no-untyped-def]
    """Sleeps (cooperatively under gevent); records its start and its end."""
    record("started", self.request.id)
    time.sleep(seconds)
    record("done", self.request.id)
    return seconds


@app.task(bind=True)
def suicide(self) -> None:  # type: ignore[no-untyped-def]
    """Kills the process that runs it, every time: a poison message."""
    record("started", self.request.id)
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(bind=True)
def sink(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    """Accepts any arguments (so hostile bodies reach the pool) and records that it ran."""
    record("done", self.request.id)
