"""One Celery 5.7 worker and one millpond worker per broker (Redis; RabbitMQ with Redis results),
each on a queue of its own, and a producer of each kind in the test process.

`Side` wraps one library's canvas API (its signatures, chain/group/chord, result classes and
exceptions) so a test builds the same canvas with whichever producer the direction names:
`celery->millpond` sends from Celery to the millpond worker's queue, `millpond->celery` from
millpond to the Celery worker's queue. The workers route what they send next (callbacks, chain
steps, chord bodies) to their own default queue, so a canvas stays on the worker it was sent to
unless a signature names a queue.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from millpond.testing.harness import wait_until
from tests.interop import sink

ROOT = Path(__file__).resolve().parents[2]
REDIS = "redis://127.0.0.1:6379/0"
AMQP = "amqp://guest:guest@127.0.0.1:5672//"
BROKERS = {"redis": REDIS, "amqp": AMQP}
#: how long any one outcome may take before a test fails (a loaded shared machine, not a sleep)
WAIT = 60.0


class Worker:
    """A worker subprocess with its output in a file, stopped by PID."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._out = log.open("ab")
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env={**os.environ, **env}, stdout=self._out, stderr=subprocess.STDOUT
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"the {self.name} worker exited with {self.proc.returncode}:\n{self.text()}"
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()


@dataclass
class Side:
    """One library's producer and the pieces of its canvas API."""

    kind: str  # "celery" or "millpond"
    app: Any
    chain: Any
    group: Any
    chord: Any
    ChordError: type[BaseException]
    TaskRevokedError: type[BaseException]
    #: the queue this side's worker consumes (its producer sends to the other side's)
    queue: str
    closers: list[Callable[[], None]] = field(default_factory=list)

    def task(self, name: str) -> Any:
        return self.app.tasks[f"interop.{name}"]

    def result(self, task_id: str) -> Any:
        return self.app.AsyncResult(task_id)

    def from_tuple(self, value: Any) -> Any:
        """A result from its stored form (`as_tuple`)."""
        if self.kind == "celery":
            from celery.result import result_from_tuple

            return result_from_tuple(value, self.app)
        from millpond.produce.result import result_from_tuple as from_tuple

        return from_tuple(value, self.app)

    def restore(self, group_id: str) -> Any:
        if self.kind == "celery":
            return self.app.GroupResult.restore(group_id)
        from millpond import GroupResult

        return GroupResult.restore(group_id, self.app)


@dataclass
class Pair:
    broker: str
    celery: Side
    millpond: Side
    workers: dict[str, Worker]

    def check_alive(self) -> None:
        for worker in self.workers.values():
            worker.check_alive()

    def logs(self) -> str:
        return "\n".join(f"--- {n} worker ---\n{w.text()[-6000:]}" for n, w in self.workers.items())


def _celery_side(broker: str, target: str, own: str) -> Side:
    from celery import chain, chord, group
    from celery.exceptions import ChordError, TaskRevokedError

    from tests.interop.celery_app import make_app

    app = make_app(broker, REDIS, target)

    def close() -> None:
        # drop the result handles Celery still waits on (a GroupResult subscribes to its
        # members), so none is collected once the interpreter has begun to shut down
        app.backend._pending_results.concrete.clear()
        app.backend._pending_results.weak.clear()
        app.close()

    return Side("celery", app, chain, group, chord, ChordError, TaskRevokedError, own, [close])


def _millpond_side(broker: str, target: str, own: str) -> Side:
    from millpond import chain, chord, group
    from millpond.exceptions import ChordError, TaskRevokedError
    from tests.interop.millpond_app import make_app

    app = make_app(broker_url=broker, result_backend=REDIS, default_queue=target, queues=[target])
    return Side(
        "millpond", app, chain, group, chord, ChordError, TaskRevokedError, own, [app.close]
    )


def _delete_queues(broker: str, queues: list[str]) -> None:
    if broker == "redis":
        sink.client().delete(*queues, *(f"{q}.dead" for q in queues))
        return
    import amqp

    conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
    conn.connect()
    try:
        chan = conn.channel()
        for name in queues:
            for queue in (name, f"{name}.dead"):
                chan.queue_delete(queue)
            chan.exchange_delete(name)
    finally:
        conn.close()


@pytest.fixture(scope="module", params=["redis", pytest.param("amqp", marks=pytest.mark.amqp)])
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    broker_name = request.param
    broker = BROKERS[broker_name]
    tag = uuid.uuid4().hex[:10]
    celery_q, millpond_q = f"interop-{tag}-celery", f"interop-{tag}-millpond"
    logs = tmp_path_factory.mktemp(f"interop-{broker_name}")
    workers: dict[str, Worker] = {}
    sides: list[Side] = []
    try:
        celery_cmd = (
            f"-m celery -A tests.interop.celery_app worker -P threads -c 4 -Q {celery_q} "
            f"-n interop-{tag}@%h --without-mingle --without-gossip --without-heartbeat -l INFO"
        )
        workers["celery"] = Worker(
            "celery",
            [sys.executable, *celery_cmd.split()],
            {"INTEROP_BROKER": broker, "INTEROP_BACKEND": REDIS, "INTEROP_QUEUE": celery_q},
            logs / "celery.log",
        )
        millpond_cmd = (
            "-m millpond worker --no-banner -A tests.interop.millpond_app:app -P threads -c 4"
        )
        workers["millpond"] = Worker(
            "millpond",
            [sys.executable, *millpond_cmd.split()],
            {
                "MILLPOND_BROKER_URL": broker,
                "MILLPOND_RESULT_BACKEND": REDIS,
                "MILLPOND_QUEUES": millpond_q,
                "MILLPOND_DEFAULT_QUEUE": millpond_q,
                "MILLPOND_LOG_FORMAT": "json",
            },
            logs / "millpond.log",
        )
        # each producer sends, by default, to the other library's worker
        celery = _celery_side(broker, millpond_q, celery_q)
        millpond = _millpond_side(broker, celery_q, millpond_q)
        sides += [celery, millpond]
        found = Pair(broker_name, celery, millpond, workers)
        _wait_ready(found)
        yield found
    finally:
        for side in sides:
            for close in side.closers:
                close()
        for worker in workers.values():
            worker.stop()
        _delete_queues(broker_name, [celery_q, millpond_q])


def _wait_ready(pair: Pair) -> None:
    """Both workers answer a task from either producer, so every queue is declared and consumed
    before a test starts."""
    for producer in (pair.celery, pair.millpond):
        for queue in (pair.celery.queue, pair.millpond.queue):
            handle = producer.task("add").apply_async((1, 1), queue=queue)
            wait_until(
                lambda h=handle: pair.check_alive() or h.ready(),
                WAIT,
                lambda q=queue, p=producer: f"an answer on {q} to {p.kind}\n{pair.logs()}",
            )
            assert handle.get(timeout=WAIT) == 2


@dataclass
class Direction:
    """A producer of one kind and the worker of the other kind that runs what it sends."""

    name: str
    producer: Side
    reader: Side  # the other library, reading the same results
    pair: Pair

    @property
    def worker_queue(self) -> str:
        return self.reader.queue


@pytest.fixture(params=["celery->millpond", "millpond->celery"])
def direction(request: pytest.FixtureRequest, pair: Pair) -> Direction:
    if request.param == "celery->millpond":
        return Direction(request.param, pair.celery, pair.millpond, pair)
    return Direction(request.param, pair.millpond, pair.celery, pair)


@pytest.fixture
def key() -> str:
    """A unique sink key for one test."""
    return f"interop:{uuid.uuid4().hex}"


def drain(key: str, count: int, pair: Pair, timeout: float = WAIT) -> list[dict[str, Any]]:
    """The first `count` entries recorded under `key`, waiting for each at most `timeout`."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        pair.check_alive()
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"only {len(out)} of {count} entries under {key} after {timeout} s: {out}\n"
                f"{pair.logs()}"
            )
        got = sink.client().blpop([key], timeout=min(left, 1.0))
        if got is not None:
            out.append(json.loads(got[1]))
    return out


def recorded(key: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in sink.client().lrange(key, 0, -1)]
