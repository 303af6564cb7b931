"""The app of the rate-limit end-to-end tests: a limited task, an unlimited one, and one limited
for the whole fleet. Each run appends `<task> <start time> <pid> <task id>` to $E2E_DIR/runs.log,
so a test measures the rate tasks actually started at, from the tasks' own clock, and counts the
runs of each task id."""

from __future__ import annotations

import os
import time
from pathlib import Path

from millpond import Millpond

app = Millpond("ratelimit-e2e")
#: the shared bucket is named after the task: a unique name per test run keeps runs apart
SHARED = os.environ.get("RL_SHARED_TASK", "rl.shared")


def _record(kind: str, task_id: str = "-") -> None:
    started = time.time()
    with open(Path(os.environ["E2E_DIR"]) / "runs.log", "a") as fh:
        fh.write(f"{kind} {started:.6f} {os.getpid()} {task_id}\n")


@app.task(name="rl.limited", rate_limit="10/s", bind=True)
def limited(self, n: int) -> None:  # type: ignore[no-untyped-def]
    _record("limited", self.request.id)


@app.task(name="rl.slow", rate_limit="2/s", bind=True)
def slow(self, n: int) -> None:  # type: ignore[no-untyped-def]
    _record("slow", self.request.id)


@app.task(name="rl.free")
def free(n: int) -> None:
    _record("free")


@app.task(name=SHARED, rate_limit="4/s", rate_limit_scope="global")
def shared(n: int) -> None:
    _record("shared")
