"""docs/guarantees.md's warm shutdown example runs as written: its `drain.py` and its shell lines
(two `millpond worker`s and the publishing one-liner) on Redis, on a queue of the test's own."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from millpond.config import plugins
from millpond.testing.harness import WorkerProcess, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "guarantees.md"
REDIS_URL = "redis://127.0.0.1:6379/0"
GAVE_BACK = "warm shutdown: gave back buffered messages to the broker"


def _example() -> tuple[str, list[list[str]]]:
    """The `drain.py` block and the argv of each line of the shell block after it."""
    text = DOC.read_text()
    module = re.search(r"```python\n(# drain\.py\n.*?)```", text, re.S)
    assert module, "docs/guarantees.md lost its drain.py example"
    shell = re.search(r"```\n(millpond worker -A drain:app.*?)```", text[module.end() :], re.S)
    assert shell, "docs/guarantees.md lost the shell lines of its drain example"
    lines = []
    for line in shell.group(1).splitlines():
        command = line.split("#", 1)[0].strip().removesuffix("&").strip()
        lines.append(shlex.split(command))
    return module.group(1), lines


def test_the_warm_shutdown_example_gives_the_short_naps_to_the_second_worker(
    tmp_path: Path,
) -> None:
    source, (first_cmd, publish_cmd, second_cmd, kill_cmd) = _example()
    assert first_cmd[:2] == second_cmd[:2] == ["millpond", "worker"]
    assert publish_cmd[:2] == ["python", "-c"] and kill_cmd[:2] == ["kill", "-TERM"]
    (tmp_path / "drain.py").write_text(source)
    queue = f"docs-drain-{uuid.uuid4().hex[:10]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MILLPOND_", "OTEL_"))}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
            "MILLPOND_QUEUES": queue,
            "MILLPOND_DEFAULT_QUEUE": queue,
        }
    )
    broker = plugins.broker_for_url(REDIS_URL)
    first = WorkerProcess(first_cmd[2:], env, tmp_path, name="first", cwd=tmp_path)
    second: WorkerProcess | None = None
    try:
        first.wait_ready()
        subprocess.run(
            [sys.executable, *publish_cmd[1:]], cwd=tmp_path, env=env, check=True, timeout=60
        )
        # the 30 s nap runs, the four short ones wait in the first worker's buffer
        wait_until(lambda: broker.queue_length(queue) == 0, 20, "the first worker to prefetch")
        second = WorkerProcess(second_cmd[2:], env, tmp_path, name="second", cwd=tmp_path)
        second.wait_ready()
        first.signal(signal.SIGTERM)
        given = wait_until(
            lambda: [line for line in first.lines() if line.get("event") == GAVE_BACK],
            10,
            "the first worker's give-back line",
        )
        assert given[0].get("given_back") == 4, given
        wait_until(
            lambda: broker.queue_length(queue) == 0, 10, "the second worker to take the naps"
        )
        assert first.proc.poll() is None, "the first worker should still run its 30 s nap"
        second.signal(signal.SIGTERM)
        assert second.wait(30) == 0, second.text()[-3000:]
        # the second worker's warm stop acknowledged what it ran: only the naps still in its
        # buffer (not yet started when the signal came, on a loaded machine) came back
        back = [line for line in second.lines() if line.get("event") == GAVE_BACK]
        assert broker.queue_length(queue) == (back[0].get("given_back", 0) if back else 0), back
    finally:
        for worker in (first, second):
            if worker is not None and worker.proc.poll() is None:
                worker.signal(signal.SIGQUIT)  # cold: the 30 s nap goes back now, then is purged
                worker.proc.wait(30)
            if worker is not None:
                worker.kill()
        broker.purge(queue)
        broker.close()
