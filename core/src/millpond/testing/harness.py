"""Real `millpond worker` subprocesses for tests, and the small helpers around them.

Written for the green-pool kit (`millpond_green.kit`), whose suites each run in their own
patched interpreter, and usable by any pool's tests. Nothing here imports gevent or eventlet: the
gevent suite must never load eventlet and vice versa. Worker subprocesses are started with the real
`millpond` console script, so they go through the command's early-patching bootstrap exactly as a
user's worker does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from millpond.testing.fixtures import unique

__all__ = [
    "AMQP_URL",
    "REDIS_URL",
    "WorkerProcess",
    "assert_clean_stderr",
    "forget_queue",
    "reachable",
    "run_command",
    "sqlite_url",
    "unique",
    "wait_until",
]

MILLPOND = Path(sys.executable).with_name("millpond")
REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.02,
) -> Any:
    """Poll `predicate` until it is truthy; fail with `what` after `timeout` seconds (a callable
    `what` is asked only then, so it can describe the state at the failure)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g}s waiting for {said}")
        time.sleep(interval)


def run_command(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m millpond <args>` in this interpreter with its output captured as text, the way a
    user runs a one-shot command (send, config, plugins, purge); `env` is added to this process's."""
    return subprocess.run(
        [sys.executable, "-m", "millpond", *args],
        check=False,  # the callers read the exit code and the output
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def sqlite_url(directory: Path) -> str:
    """The embedded broker in `directory`, with short leases so a lapse shows up quickly."""
    return f"sqlite://{directory / 'broker.sqlite3'}?lease_timeout=3&heartbeat_interval=0.5"


class WorkerProcess:
    """A `millpond worker` subprocess; stderr (the JSON log) and stdout go to files in `directory`.

    The worker sees this process's environment without its `MILLPOND_*` and `OTEL_*` variables
    (a developer's own settings must not leak into a test), plus `env`. `stop()` sends SIGTERM
    and waits (a warm shutdown); `kill()` is the fixture's last resort. Both act on the PID.
    """

    def __init__(
        self,
        args: list[str],
        env: Mapping[str, str],
        directory: Path,
        *,
        name: str = "worker",
        cwd: Path | None = None,
    ) -> None:
        self.stderr_path = directory / f"{name}.stderr"
        self.stdout_path = directory / f"{name}.stdout"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("MILLPOND_", "OTEL_"))}
        full_env["MILLPOND_LOG_FORMAT"] = "json"
        full_env.update(env)
        with open(self.stderr_path, "wb") as err, open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.command(args),
                cwd=cwd or directory,
                env=full_env,
                stdout=out,
                stderr=err,
            )

    def command(self, args: list[str]) -> list[str]:
        """The real console script, the way a user starts a worker; a subclass may start it
        another way (in a trimmed interpreter, say)."""
        return [str(MILLPOND), "worker", "--no-banner", *args]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def text(self) -> str:
        """Everything the worker wrote: its log (stderr), then what its tasks printed (stdout)."""
        return self.stderr() + self.stdout_path.read_text(errors="replace")

    def lines(self) -> list[dict[str, Any]]:
        """Every stderr line as JSON; a line that is not JSON becomes {"raw": line}."""
        out: list[dict[str, Any]] = []
        for raw in self.stderr().splitlines():
            try:
                value = json.loads(raw)
            except ValueError:
                value = None
            out.append(value if isinstance(value, dict) else {"raw": raw})
        return out

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == event]

    def wait_line(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 30, what: str = "a log line"
    ) -> dict[str, Any]:
        """The first stderr line (as `lines()` reads it) that `match` accepts, waiting up to
        `timeout` seconds; fails with the log's tail if the worker exits or time runs out."""

        def found() -> dict[str, Any] | None:
            line = next((line for line in self.lines() if match(line)), None)
            if line is None and self.proc.poll() is not None:
                raise AssertionError(
                    f"the worker exited with {self.proc.returncode} while waiting for {what}:\n"
                    f"{self.stderr()[-4000:]}"
                )
            return line

        line: dict[str, Any] = wait_until(found, timeout, what)
        return line

    def wait_ready(self, timeout: float = 30) -> WorkerProcess:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the worker exited with {self.proc.returncode} before it was ready:\n"
                    f"{self.stderr()[-4000:]}"
                )
            return bool(self.events("worker ready"))

        wait_until(ready, timeout, "the worker to log 'worker ready'", interval=0.05)
        return self

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def wait(self, timeout: float = 30) -> int:
        """The exit code; fails with the log's tail if the worker is still running after
        `timeout` seconds."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.pid} did not exit within {timeout:g}s:\n{self.stderr()[-4000:]}"
            ) from None

    def stop(self, timeout: float = 30) -> int:
        """Warm shutdown (SIGTERM); returns the exit code."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def assert_clean_stderr(worker: WorkerProcess) -> None:
    """Every stderr line is a JSON log line: no Python warning, traceback or stray print."""
    stray = [line["raw"] for line in worker.lines() if "raw" in line and line["raw"].strip()]
    assert not stray, "the worker wrote non-log output to stderr:\n" + "\n".join(stray[:40])
    text = worker.stderr()
    for needle in ("MonkeyPatchWarning", "Monkey-patching", "monkey_patch", "Traceback"):
        assert needle not in text, f"{needle!r} in the worker's stderr:\n{text[-4000:]}"


def forget_queue(broker_url: str, queue: str, task_ids: list[str] | None = None) -> None:
    """Empty what a test left on a shared server: the queue, its dead letters, its results.

    Goes through the broker and result-backend plugins the URL names (the contracts' `purge` and
    `forget`), so the testing helpers need no client library of their own; results of a broker
    without a store of its own went to Redis (`REDIS_URL`).
    """
    from millpond.config import plugins
    from millpond.contracts.broker import dead_letter_queue

    broker = plugins.broker_for_url(broker_url)
    try:
        for name in (queue, dead_letter_queue(queue)):
            try:
                broker.purge(name)
            except Exception:
                pass
        if task_ids:
            backend = broker.default_backend() or plugins.backend_for_url(REDIS_URL)
            try:
                for task_id in task_ids:
                    backend.forget(task_id)
            finally:
                backend.close()
    finally:
        broker.close()
