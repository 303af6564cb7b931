"""The app end-to-end tests run in `millpond worker` subprocesses.

Tasks record each execution as a line in a file under $E2E_DIR, so tests can count executions per
task id across worker restarts and kills.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import structlog

from millpond import Millpond

app = Millpond("e2e")
log = structlog.get_logger("e2e")


def _record(kind: str, task_id: str) -> None:
    directory = os.environ.get("E2E_DIR")
    if directory:
        with open(Path(directory) / f"{kind}.log", "a") as fh:
            fh.write(task_id + "\n")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def fail(message: str) -> None:
    raise ValueError(message)


@app.task
def shapeless() -> object:
    """Returns what no result backend can store as JSON."""
    return {1, 2}


@app.task(bind=True)
def slow(self, seconds: float) -> float:  # type: ignore[no-untyped-def]
    _record("started", self.request.id)
    log.info("slow task sleeping", seconds=seconds)
    time.sleep(seconds)
    _record("finished", self.request.id)
    return seconds


@app.task(bind=True)
def count(self) -> str:  # type: ignore[no-untyped-def]
    _record("ran", self.request.id)
    return self.request.id
