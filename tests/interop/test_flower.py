"""Real Flower (the `flower` package) watches a millpond worker and a Celery worker side by side,
on Redis and on RabbitMQ: both show up online, and the tasks sent to each end SUCCESS or FAILURE
in Flower's task list, with runtimes, under the worker that ran them.

Flower learns about workers and tasks from events (its `EventReceiver`); its worker page (`GET
/api/workers?refresh=1`) is made of remote-control replies (`stats`, `active_queues`, ...), which
the millpond worker's control node answers. A third worker, a millpond one started without `-E`,
sends task events once Flower's periodic `enable_events` reaches it.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from millpond.testing.servers import free_port
from tests.interop.conftest import BROKERS, REDIS, WAIT, Worker, _delete_queues, wait_until
from tests.interop.test_events import start_worker

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.slow]


@dataclass
class Watched:
    broker: str
    flower: Worker
    port: int
    workers: dict[str, Worker]
    hostnames: dict[str, str]
    queues: dict[str, str]
    producer: Any

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as resp:
            return json.loads(resp.read())

    def check_alive(self) -> None:
        self.flower.check_alive()
        for worker in self.workers.values():
            worker.check_alive()

    def logs(self) -> str:
        every = {"flower": self.flower, **self.workers}
        return "\n".join(f"--- {n} ---\n{w.text()[-4000:]}" for n, w in every.items())


def _flower_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.fixture(scope="module", params=["redis", pytest.param("amqp", marks=pytest.mark.amqp)])
def watched(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Watched]:
    from tests.interop.celery_app import make_app

    broker = request.param
    url = BROKERS[broker]
    tag = uuid.uuid4().hex[:10]
    logs: Path = tmp_path_factory.mktemp(f"flower-{broker}")
    queues = {
        "celery": f"flower-{tag}-celery",
        "millpond": f"flower-{tag}-millpond",
        "plain": f"flower-{tag}-plain",
    }
    hostnames = {kind: f"{kind}-{tag}@interop" for kind in queues}
    port = free_port()
    started: dict[str, Worker] = {}
    producer = make_app(url, REDIS, queues["millpond"])
    try:
        flower_cmd = [
            sys.executable, "-m", "celery", "--broker", url, "flower",
            "--address=127.0.0.1", f"--port={port}", "--inspect_timeout=3000",
        ]  # fmt: skip
        started["flower"] = Worker(
            "flower",
            flower_cmd,
            {"FLOWER_UNAUTHENTICATED_API": "true"},  # Flower 2 closes its API without it
            logs / "flower.log",
        )
        wait_until(
            lambda: started["flower"].check_alive() or _flower_up(port),
            WAIT,
            lambda: f"Flower on port {port}\n{started['flower'].text()[-4000:]}",
        )
        celery_cmd = [
            sys.executable, "-m", "celery", "-A", "tests.interop.celery_app", "worker",
            "-E", "-P", "threads", "-c", "2", "-Q", queues["celery"],
            "-n", hostnames["celery"], "--without-mingle", "--without-gossip", "-l", "INFO",
        ]  # fmt: skip
        started["celery"] = Worker(
            "celery",
            celery_cmd,
            {"INTEROP_BROKER": url, "INTEROP_BACKEND": REDIS, "INTEROP_QUEUE": queues["celery"]},
            logs / "celery.log",
        )
        started["millpond"] = start_worker(
            url, queues["millpond"], hostnames["millpond"], logs / "millpond.log", "-E"
        )
        # no -E: task events only once Flower's enable_events reaches it
        started["plain"] = start_worker(
            url, queues["plain"], hostnames["plain"], logs / "plain.log"
        )
        workers = {kind: started[kind] for kind in queues}
        yield Watched(broker, started["flower"], port, workers, hostnames, queues, producer)
    finally:
        for worker in started.values():
            worker.stop()
        producer.close()
        _delete_queues(broker, list(queues.values()))


def test_flower_sees_both_workers_online(watched: Watched) -> None:
    def online() -> bool:
        watched.check_alive()
        status = watched.get("/api/workers?status=true")
        return all(status.get(name) is True for name in watched.hostnames.values())

    wait_until(online, WAIT, lambda: f"both workers online in Flower\n{watched.logs()}")


def test_flower_shows_each_workers_tasks_with_their_outcome_and_runtime(
    watched: Watched,
) -> None:
    sent: dict[str, tuple[str, str]] = {}  # task id -> (worker kind, expected state)
    for kind in ("celery", "millpond"):
        queue = watched.queues[kind]
        for name, args, state in (("add", (2, 3), "SUCCESS"), ("boom", ("x",), "FAILURE")):
            result = watched.producer.send_task(f"interop.{name}", args, queue=queue)
            sent[result.id] = (kind, state)

    def finished() -> dict[str, Any] | None:
        watched.check_alive()
        tasks = watched.get("/api/tasks")
        done = {i: tasks[i] for i in sent if i in tasks and tasks[i]["state"] == sent[i][1]}
        return tasks if len(done) == len(sent) else None

    tasks = wait_until(finished, WAIT, lambda: f"Flower to list {sent}\n{watched.logs()}")
    for task_id, (kind, state) in sent.items():
        task = tasks[task_id]
        assert task["worker"] == watched.hostnames[kind], task
        assert task["state"] == state
        assert task["received"] and task["started"], task
        if state == "SUCCESS":
            assert task["runtime"] > 0, task
            assert task["result"] == "5"
        else:
            assert task["exception"] == "ValueError('boom x')", task
    # one task in detail, as Flower's task page reads it
    millpond_ok = next(i for i, (k, s) in sent.items() if k == "millpond" and s == "SUCCESS")
    detail = watched.get(f"/api/task/info/{millpond_ok}")
    assert detail["name"] == "interop.add"
    assert detail["args"] == "(2, 3)"
    assert detail["state"] == "SUCCESS"


def test_flower_worker_page_has_the_millpond_workers_stats(watched: Watched) -> None:
    """Flower's inspect calls (stats, registered, active_queues, ...) answered by the control node."""

    def listed() -> dict[str, Any] | None:
        watched.check_alive()
        workers = watched.get("/api/workers?refresh=1")
        wanted = (watched.hostnames["celery"], watched.hostnames["millpond"])
        return workers if all("stats" in workers.get(n, {}) for n in wanted) else None

    workers = wait_until(listed, WAIT, lambda: f"both workers on Flower's page\n{watched.logs()}")
    mine = workers[watched.hostnames["millpond"]]
    assert mine["stats"]["pool"]["max-concurrency"] == 4
    assert mine["stats"]["pid"] == watched.workers["millpond"].proc.pid
    assert "interop.add" in mine["registered"]
    assert [q["name"] for q in mine["active_queues"]] == [watched.queues["millpond"]]


def test_flower_turns_on_task_events_of_a_worker_started_without_them(watched: Watched) -> None:
    plain = watched.workers["plain"]
    wait_until(
        lambda: plain.check_alive() or "task events enabled by remote control" in plain.text(),
        WAIT,
        lambda: f"Flower's enable_events to reach the worker\n{watched.logs()}",
    )
    result = watched.producer.send_task("interop.add", (4, 5), queue=watched.queues["plain"])

    def listed() -> dict[str, Any] | None:
        watched.check_alive()
        task = watched.get("/api/tasks").get(result.id)
        return task if task is not None and task["state"] == "SUCCESS" else None

    task = wait_until(listed, WAIT, lambda: f"Flower to list {result.id}\n{watched.logs()}")
    assert task["worker"] == watched.hostnames["plain"]
    assert task["name"] == "interop.add"
    assert task["received"] and task["runtime"] > 0
