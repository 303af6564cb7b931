"""What the fault-injection tests share: a rig per test (broker, queue, ledger, workers), the
ledger that counts executions per task id and process-tree helpers.

Workers are real `millpond worker` subprocesses started through
`millpond.testing.harness.WorkerProcess` (the same class the end-to-end and plugin tests use); the
producer is an app in the test process. Nothing here sleeps to synchronise: every wait polls a
condition against a deadline and fails with what it was waiting for and what it saw.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import psutil

from millpond.config import plugins
from millpond.contracts.broker import Broker, dead_letter_queue
from millpond.produce.app import Millpond
from millpond.testing.harness import WorkerProcess, wait_until
from millpond.wire.protocol import Message, encode_task
from tests.e2e.harness import ROOT

REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
APP = "tests.faults.app:app"
NOOP = "tests.faults.app.noop"
NAP = "tests.faults.app.nap"
SUICIDE = "tests.faults.app.suicide"
SINK = "tests.faults.app.sink"

#: short lease timings: a killed worker's Redis messages come back within about 2 s
REDIS_FAST = {
    "MILLPOND_REDIS__LEASE_TIMEOUT": "1",
    "MILLPOND_REDIS__HEARTBEAT_INTERVAL": "0.2",
    "MILLPOND_REDIS__SOCKET_TIMEOUT": "2",
    "MILLPOND_REDIS__IDLE_TIMEOUT": "2",
}
#: short AMQP timings: a stalled connection is found dead within a few seconds
AMQP_FAST = {
    "MILLPOND_AMQP__HEARTBEAT": "2",
    "MILLPOND_AMQP__OPERATION_TIMEOUT": "2",
    "MILLPOND_AMQP__CONNECT_TIMEOUT": "2",
    "MILLPOND_AMQP__RECONNECT_MAX_DELAY": "0.5",
}


#: what a worker logs when its broker connection broke (RabbitMQ, Redis)
_LOST = re.compile(r"lost the consumer connection|redis: [^\n]* failed")


def unique(prefix: str = "faults") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Report:
    """Executions per task id, against the ids that were sent."""

    label: str
    sent: int
    missing: list[str]
    duplicates: dict[str, int]
    extra: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        dup = sum(n - 1 for n in self.duplicates.values())
        text = (
            f"[{self.label}] sent {self.sent}: lost {len(self.missing)}, "
            f"duplicated {len(self.duplicates)} task(s) ({dup} extra run(s))"
        )
        if self.duplicates:
            sample = dict(list(self.duplicates.items())[:5])
            text += f"; e.g. {sample}"
        if self.missing:
            text += f"; lost e.g. {self.missing[:5]}"
        return text


class Ledger:
    """Reads the ledger files the fault app writes (one line per execution)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def counts(self, kind: str = "done") -> Counter[str]:
        path = self.directory / f"{kind}.log"
        if not path.exists():
            return Counter()
        return Counter(path.read_text().split())

    def progress(self, kind: str = "done") -> int:
        """Executions recorded so far, cheaply (every line is a 36-character uuid + newline)."""
        try:
            return (self.directory / f"{kind}.log").stat().st_size // 37
        except FileNotFoundError:
            return 0

    def wait_progress(
        self, count: int, timeout: float, kind: str = "done", alive: Any = None
    ) -> int:
        """Wait until at least `count` executions are recorded."""

        def enough() -> int:
            if alive is not None:
                alive()
            return self.progress(kind) >= count and self.progress(kind)

        return int(wait_until(enough, timeout, f"{count} recorded executions ({kind})", 0.005))

    def wait_for(
        self, ids: Sequence[str], timeout: float, *, kind: str = "done", alive: Any = None
    ) -> Counter[str]:
        """Wait until every id has run at least once; `alive()` may raise to fail early."""
        wanted = set(ids)
        seen: Counter[str] = Counter()

        def all_there() -> bool:
            nonlocal seen
            if alive is not None:
                alive()
            seen = self.counts(kind)
            return wanted.issubset(seen)

        try:
            wait_until(all_there, timeout, f"{len(wanted)} tasks to run", interval=0.05)
        except AssertionError:
            missing = wanted - set(seen)
            raise AssertionError(
                f"after {timeout:g} s, {len(missing)} of {len(wanted)} tasks never ran "
                f"(e.g. {sorted(missing)[:5]})"
            ) from None
        return seen

    def report(self, label: str, ids: Sequence[str], kind: str = "done") -> Report:
        counts = self.counts(kind)
        wanted = set(ids)
        report = Report(
            label=label,
            sent=len(ids),
            missing=[i for i in ids if counts[i] == 0],
            duplicates={i: n for i, n in counts.items() if n > 1 and i in wanted},
            extra=[i for i in counts if i not in wanted],
        )
        print(report)
        return report


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (prefork: fork server and children)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def prefork_children(pid: int) -> list[int]:
    """The pids of a prefork worker's task children (grandchildren, under the fork server)."""
    try:
        root = psutil.Process(pid)
        out: list[int] = []
        for server in root.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                out.extend(c.pid for c in server.children() if c.status() != "zombie")
        return out
    except psutil.NoSuchProcess:
        return []


def tree_rss(pid: int) -> int:
    total = 0
    for proc in process_tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += proc.memory_info().rss
    return total


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, the root first (so its log does not fill with
    children dying under it), all by PID."""
    for proc in process_tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)


class Rig:
    """One test's world: a broker URL, a unique queue, a ledger directory, workers, a producer."""

    def __init__(self, directory: Path, broker_url: str, env: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.broker_url = broker_url
        self.queue = unique()
        self.ledger = Ledger(directory)
        self.env = {
            "MILLPOND_BROKER_URL": broker_url,
            "MILLPOND_QUEUES": self.queue,
            "MILLPOND_DEFAULT_QUEUE": self.queue,
            "MILLPOND_IGNORE_RESULT": "true",
            "MILLPOND_SHUTDOWN_TIMEOUT": "30",
            "FAULTS_DIR": str(directory),
            **(env or {}),
        }
        self.workers: list[WorkerProcess] = []
        self._producer: Millpond | None = None

    # -- workers ---------------------------------------------------------------------------------
    def spawn(
        self, pool: str, concurrency: int, *args: str, env: dict[str, str] | None = None
    ) -> WorkerProcess:
        worker = WorkerProcess(
            ["-A", APP, "-P", pool, "-c", str(concurrency), *args],
            {**self.env, **(env or {})},
            self.directory,
            name=f"worker-{len(self.workers)}-{pool}",
            cwd=ROOT,
        )
        self.workers.append(worker)
        return worker

    def alive(self, *workers: WorkerProcess) -> Any:
        """A check for `Ledger.wait_for`: fail at once (with the log) if a worker exited."""

        def check() -> None:
            for worker in workers:
                if worker.proc.poll() is not None:
                    raise AssertionError(
                        f"worker {worker.pid} exited with {worker.proc.returncode}:\n"
                        + worker.text()[-4000:]
                    )

        return check

    # -- producing -------------------------------------------------------------------------------
    @property
    def producer(self) -> Millpond:
        if self._producer is None:
            self._producer = Millpond(
                "faults-producer",
                broker_url=self.broker_url,
                default_queue=self.queue,
                queues=[self.queue],
                ignore_result=True,
            )
            self._producer.broker.declare([self.queue])
        return self._producer

    @property
    def broker(self) -> Broker:
        return self.producer.broker

    def publish(self, count: int, task: str = NOOP, args: Sequence[Any] = ()) -> list[str]:
        """Send `count` tasks with fresh ids; returns the ids in publishing order."""
        ids = [str(uuid.uuid4()) for _ in range(count)]
        self.publish_messages(encode_task(task, args, task_id=i) for i in ids)
        return ids

    def publish_messages(self, messages: Iterable[Message]) -> None:
        broker = self.broker
        for message in messages:
            broker.publish(self.queue, message)

    def load(
        self, count: int, task: str = NOOP, args: Sequence[Any] = (), *, wait: bool = True
    ) -> list[str]:
        """Fill the queue as fast as the broker takes it and (before any worker consumes, with
        `wait`) wait until the broker holds every message. On RabbitMQ this publishes without
        confirms (12,000/s instead of 700/s here): the ledger, or the wait on the queue length,
        is the confirmation."""
        ids = [str(uuid.uuid4()) for _ in range(count)]
        messages = (encode_task(task, args, task_id=i) for i in ids)
        if not self.broker_url.startswith("amqp"):
            self.publish_messages(messages)
        else:
            bulk = plugins.broker_for_url(self.broker_url, {"confirm_publish": False})
            try:
                for message in messages:
                    bulk.publish(self.queue, message)
            finally:
                bulk.close()
        if not wait:
            return ids
        broker = self.broker
        wait_until(
            lambda: broker.queue_length(self.queue) >= count,
            30,
            f"the broker to hold the {count} messages just published to {self.queue}",
        )
        return ids

    def assert_no_duplicates(
        self, report: Report, why: str = "nothing should have run twice"
    ) -> None:
        """Fail on duplicates, unless a worker lost its broker connection during the test.

        A worker whose connection broke (a fault this test did not mean to inject: a busy machine
        missing heartbeats, say) rightly runs some tasks again under at-least-once. Such a run
        proves nothing about duplicates either way; it is reported, not failed. (No test restarts
        the shared RabbitMQ: those that stop a server use a private one.)
        """
        if not report.duplicates:
            return
        lost = [w.pid for w in self.workers if _LOST.search(w.text())]
        if lost:
            print(
                f"[{report.label}] duplicates allowed: workers {lost} lost their broker connection"
            )
            return
        raise AssertionError(f"{why}: {report}")

    def dead_letters(self) -> list[Message]:
        return self.broker.dead_letters(self.queue, 1000)

    # -- clean-up --------------------------------------------------------------------------------
    def close(self) -> None:
        for worker in self.workers:
            kill_tree(worker.pid)
            worker.kill()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                self._cleanup_queues()
            self._producer.close()

    def _cleanup_queues(self) -> None:
        if self.broker_url.startswith("redis"):
            import redis

            client = redis.Redis.from_url(self.broker_url)
            try:
                found = list(client.scan_iter(match=f"*{self.queue}*"))
                if found:
                    client.delete(*found)
            finally:
                client.close()
        elif self.broker_url.startswith("amqp"):
            delete_amqp_queues([self.queue, dead_letter_queue(self.queue)], self.broker_url)


def delete_amqp_queues(queues: Iterable[str], url: str = AMQP_URL) -> None:
    import amqp

    parts = urlsplit(url)
    conn = amqp.Connection(
        f"{parts.hostname}:{parts.port or 5672}",
        userid=unquote(parts.username or "guest"),
        password=unquote(parts.password or "guest"),
        virtual_host=unquote(parts.path[1:]) or "/",
        connect_timeout=5,
    )
    conn.connect()
    try:
        chan = conn.channel()
        for queue in queues:
            with contextlib.suppress(Exception):
                chan.queue_delete(queue)
                chan.exchange_delete(queue)
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def since(start: float) -> float:
    return round(time.monotonic() - start, 2)


def env_without_millpond() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MILLPOND_")}
