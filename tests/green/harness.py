"""Helpers shared by the gevent and eventlet suites (each runs in its own patched interpreter).

Nothing here imports gevent or eventlet: the gevent suite must never load eventlet and vice versa.
Worker subprocesses are started with the real `millpond` console script, so they go through the
command's early-patching bootstrap exactly as a user's worker does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MILLPOND = Path(sys.executable).with_name("millpond")
REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
) -> Any:
    """Poll `predicate` until it is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


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
    """A `millpond worker` subprocess; stderr (the JSON log) and stdout go to files.

    `stop()` sends SIGTERM and waits (a warm shutdown); `kill()` is the fixture's last resort.
    """

    def __init__(
        self,
        args: list[str],
        env: Mapping[str, str],
        directory: Path,
        *,
        name: str = "worker",
        cwd: Path = ROOT,
    ) -> None:
        self.stderr_path = directory / f"{name}.stderr"
        self.stdout_path = directory / f"{name}.stdout"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("MILLPOND_", "OTEL_"))}
        full_env.update({"MILLPOND_LOG_FORMAT": "json", "PYTHONPATH": str(ROOT)})
        full_env.update(env)
        with open(self.stderr_path, "wb") as err, open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen(
                [str(MILLPOND), "worker", "--no-banner", *args],
                cwd=cwd,
                env=full_env,
                stdout=out,
                stderr=err,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

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

    def stop(self, timeout: float = 30) -> int:
        """Warm shutdown (SIGTERM); returns the exit code."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.pid} did not exit within {timeout:g}s of SIGTERM:\n"
                f"{self.stderr()[-4000:]}"
            ) from None

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
    """Remove what a test left on a shared server: the queue, its dead letters, its results.

    Uses the servers' own clients directly (the test's clean-up, not the code under test).
    """
    if broker_url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = list(client.scan_iter(match=f"*{queue}*"))
            keys += [f"celery-task-meta-{task_id}" for task_id in task_ids or []]
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
        finally:
            client.close()
    elif broker_url.startswith("amqp"):
        import amqp

        conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
        conn.connect()
        try:
            chan = conn.channel()
            for name in (queue, f"{queue}.dead"):
                chan.queue_delete(name)
            chan.exchange_delete(queue)
        except Exception:
            pass  # nothing was declared
        finally:
            conn.close()
    if task_ids and not broker_url.startswith("redis"):
        forget_queue(REDIS_URL, queue, task_ids)  # results went to Redis
