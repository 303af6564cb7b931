"""Fixtures for the observability suite: worker subprocesses, producers, a fresh broker per test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.observability.obs_app:app"
#: every pool the suite runs: all six first-party pools must be installed and load
POOLS = ("solo", "threads", "prefork", "gevent", "eventlet", "asyncio")


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll `check` until it returns something truthy; AssertionError naming `what` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class Proc:
    """A subprocess (usually `millpond worker`) logging JSON lines to a file; stopped by PID."""

    def __init__(self, argv: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=dict(env), stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for raw in self.text().splitlines():
            try:
                value = json.loads(raw)
            except ValueError:
                value = {"event": raw, "_raw": True}
            out.append(value if isinstance(value, dict) else {"event": raw, "_raw": True})
        return out

    def wait_line(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 30, what: str = "a log line"
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            for line in self.lines():
                if match(line):
                    return line
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"process exited with {self.proc.returncode} while waiting "
                    f"for {what}:\n{self.text()[-4000:]}"
                )
            return None

        return wait_until(check, timeout, f"{what}; output so far:\n{self.text()[-3000:]}")  # type: ignore[no-any-return]

    def wait_ready(self, timeout: float = 30) -> Proc:
        self.wait_line(lambda line: line.get("event") == "worker ready", timeout, "worker ready")
        return self

    def endpoint_port(self, route: str = "/livez", timeout: float = 30) -> int:
        line = self.wait_line(
            lambda ln: (
                ln.get("event") == "http endpoint listening" and route in ln.get("routes", [])
            ),
            timeout,
            f"the http endpoint serving {route}",
        )
        return int(line["port"])

    def wait(self, timeout: float = 30) -> int:
        """Wait for the process to exit on its own; returns the exit code."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"pid {self.pid} still running after {timeout}s:\n{self.text()[-3000:]}"
            ) from None

    def terminate(self, timeout: float = 30) -> int:
        """Warm shutdown (SIGTERM); returns the exit code."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"pid {self.pid} did not exit within {timeout}s:\n{self.text()[-3000:]}"
            ) from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


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
        log = tmp_path / f"worker-{len(started)}.log"
        argv = [sys.executable, "-m", "millpond", "worker", "--no-banner", "-A", app, *args]
        proc = Proc(argv, {**obs_env, **(env or {})}, log)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


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
