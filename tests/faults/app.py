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
from millpond.contracts.hooks import Hooks

app = Millpond("faults")


class HoldChildren(Hooks):
    """With $FAULTS_HOLD_CHILDREN set, each prefork child waits (at most a minute) for that file
    before it reports ready: a test can act "while the pool forks" without racing start-up."""

    def process_started(self) -> None:
        gate = os.environ.get("FAULTS_HOLD_CHILDREN")
        deadline = time.monotonic() + 60
        while gate and not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)


app.add_hooks(HoldChildren())


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
def nap_counted(self, seconds: float) -> float:  # type: ignore[no-untyped-def]
    """`nap` that also records (`redelivered.log`) each run of a message delivered before."""
    if self.request.delivery_count > 1:
        record("redelivered", self.request.id)
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


@app.task(bind=True)
def chord_part(self, value: int) -> int:  # type: ignore[no-untyped-def]
    """A chord header task: a little work, then its value."""
    time.sleep(0.002)
    record("part", self.request.id)
    return value


@app.task(bind=True)
def chord_body(self, values: list[int], expected: int) -> int:  # type: ignore[no-untyped-def]
    """A chord body: checks it got every header result, then records that it ran."""
    if sum(values) != expected or len(values) != 10:
        raise ValueError(f"chord body got {values!r}, expected 10 parts summing to {expected}")
    record("body", self.request.id)
    return sum(values)


@app.task(bind=True, max_retries=3)
def retry_once(self) -> str:  # type: ignore[no-untyped-def]
    """Asks to run again a second later on its first attempt (a broker-held delay), then ends."""
    if self.request.retries == 0:
        record("tried", self.request.id)
        raise self.retry(countdown=1)
    record("done", self.request.id)
    return "retried"
