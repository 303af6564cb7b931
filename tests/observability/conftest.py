"""Fixtures for the observability suite: worker subprocesses, producers, a fresh broker per test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from millpond.testing.harness import WorkerProcess

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.observability.obs_app:app"
#: every pool the suite runs: all six first-party pools must be installed and load
POOLS = ("solo", "threads", "prefork", "gevent", "eventlet", "asyncio")


class Proc(WorkerProcess):
    """A `millpond worker` of this suite, with the port of the HTTP endpoint it serves."""

    def endpoint_port(self, route: str = "/livez", timeout: float = 30) -> int:
        line = self.wait_line(
            lambda ln: (
                ln.get("event") == "http endpoint listening" and route in ln.get("routes", [])
            ),
            timeout,
            f"the http endpoint serving {route}",
        )
        return int(line["port"])


def clean_env() -> dict[str, str]:
    """This process's environment without OTEL_* and MILLPOND_* variables, with the repository
    on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MILLPOND_"))}
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture
def obs_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a worker and a producer sharing a fresh sqlite broker and a unique queue.

    Every OTEL_* and MILLPOND_* variable of the test runner's own environment is dropped, so only
    what a test sets reaches the processes.
    """
    queue = f"obs-{uuid.uuid4().hex[:10]}"
    env = clean_env()
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "MILLPOND_BROKER_URL": f"sqlite://{tmp_path / 'broker.sqlite3'}"
            "?lease_timeout=3&heartbeat_interval=0.5",
            "MILLPOND_QUEUES": queue,
            "MILLPOND_DEFAULT_QUEUE": queue,
            "MILLPOND_LOG_FORMAT": "json",
            "MILLPOND_SHUTDOWN_TIMEOUT": "20",
        }
    )
    return env


@pytest.fixture
def spawn(tmp_path: Path, obs_env: dict[str, str]) -> Iterator[Callable[..., Proc]]:
    """Start `millpond worker` subprocesses; each is killed by PID at teardown if still alive."""
    started: list[Proc] = []

    def start(*args: str, env: Mapping[str, str] | None = None, app: str = APP) -> Proc:
        name = f"worker-{len(started)}"
        proc = Proc(["-A", app, *args], {**obs_env, **(env or {})}, tmp_path, name=name, cwd=ROOT)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def run_python(
    code: str, env: Mapping[str, str], timeout: float = 60, args: list[str] | None = None
) -> Any:
    """Run `code` in a fresh interpreter (from the repository root) with `args` as its argv;
    returns the JSON it prints on its last stdout line. A non-zero exit is an AssertionError with
    its output."""
    done = subprocess.run(
        [sys.executable, "-c", code, *(args or [])],
        cwd=ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"python exited with {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        )
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else None


def run_python_raw(
    code: str, env: Mapping[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
