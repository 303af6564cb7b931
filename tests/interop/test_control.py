"""Real Celery 5.7 remote control (the `celery` CLI and `app.control`) against `millpond worker`
subprocesses, on Redis and on RabbitMQ: the replies Celery's tools read and the effects they ask for.

Each broker gets two millpond workers (prefork, which can terminate a running task, and threads,
which cannot) on a queue and a control namespace of their own (`control_exchange`), so a
`shutdown` here never reaches another suite's workers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from millpond.testing.harness import WorkerProcess
from tests.interop import sink
from tests.interop.conftest import BROKERS, REDIS, ROOT, WAIT, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.e2e]


@dataclass
class Fleet:
    broker: str
    namespace: str
    queue: str
    prefork: str  # node names
    threads: str
    celery_node: str  # a Celery worker in the same control namespace, on a queue of its own
    workers: dict[str, WorkerProcess]
    celery: Any  # the Celery app (producer and control client)
    env: dict[str, str]

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{w.text()[-4000:]}" for n, w in self.workers.items())

    def celery_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tests.interop.celery_app", *args],
            cwd=ROOT,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=WAIT,
        )

    def logged(self, node: str, event: str, task_id: str) -> bool:
        return any(
            line.get("event") == event and line.get("task_id") == task_id
            for line in self.workers[node].lines()
        )


@pytest.fixture(scope="module", params=["redis", pytest.param("amqp", marks=pytest.mark.amqp)])
def fleet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    from tests.interop.celery_app import make_app

    broker = BROKERS[request.param]
    tag = uuid.uuid4().hex[:10]
    namespace, queue = f"ctl-{tag}", f"ctl-{tag}-q"
    home = tmp_path_factory.mktemp(f"control-{request.param}")
    workers: dict[str, WorkerProcess] = {}
    names = {"prefork": f"prefork-{tag}@test", "threads": f"threads-{tag}@test"}
    base = {
        "MILLPOND_BROKER_URL": broker,
        "MILLPOND_RESULT_BACKEND": REDIS,
        "MILLPOND_QUEUES": queue,
        "MILLPOND_CONTROL__EXCHANGE": namespace,
        "MILLPOND_HOME": str(home),
    }
    app = make_app(broker, REDIS, queue, control_exchange=namespace)
    try:
        for pool, node in names.items():
            workers[node] = WorkerProcess(
                ["-A", "tests.interop.millpond_app:app", "-P", pool, "-c", "2"],
                {**base, "MILLPOND_WORKER_NAME": node},
                home,
                name=pool,
                cwd=ROOT,
            )
        env = {
            "INTEROP_BROKER": broker,
            "INTEROP_BACKEND": REDIS,
            "INTEROP_QUEUE": queue,
            "INTEROP_CONTROL_EXCHANGE": namespace,
        }
        celery_node = f"celery-{tag}@test"
        celery_log = (home / "celery.log").open("ab")
        celery_worker = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "tests.interop.celery_app", "worker",
                "-P", "threads", "-c", "2", "-Q", f"{queue}-celery", "-n", celery_node,
                "--without-gossip", "--without-heartbeat", "-l", "INFO",
            ],
            cwd=ROOT, env={**os.environ, **env}, stdout=celery_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        for worker in workers.values():
            worker.wait_ready(WAIT)
        wait_until(
            lambda: app.control.ping(destination=[celery_node], timeout=1.0),
            WAIT,
            lambda: f"the Celery worker to answer\n{(home / 'celery.log').read_text()[-3000:]}",
        )
        yield Fleet(
            request.param,
            namespace,
            queue,
            names["prefork"],
            names["threads"],
            celery_node,
            workers,
            app,
            env,
        )
    finally:
        app.close()
        for worker in workers.values():
            worker.kill()
        if "celery_worker" in locals():
            celery_worker.terminate()
            try:
                celery_worker.wait(20)
            except subprocess.TimeoutExpired:
                celery_worker.kill()
                celery_worker.wait(10)
            celery_log.close()


def _inspect(fleet: Fleet, node: str) -> Any:
    return fleet.celery.control.inspect(destination=[node], timeout=5.0)


def test_celery_cli_ping_reaches_millpond_workers(fleet: Fleet) -> None:
    done = fleet.celery_cli("inspect", "ping", "--timeout", "5")
    assert done.returncode == 0, done.stdout + done.stderr
    for node in (fleet.prefork, fleet.threads):
        assert f"->  {node}: OK" in done.stdout
    assert "pong" in done.stdout


def test_app_control_ping_answers_per_destination(fleet: Fleet) -> None:
    assert _inspect(fleet, fleet.prefork).ping() == {fleet.prefork: {"ok": "pong"}}
    replies = fleet.celery.control.ping(timeout=5.0)
    assert {fleet.prefork: {"ok": "pong"}} in replies
    assert {fleet.threads: {"ok": "pong"}} in replies


def test_stats_has_the_shape_flower_reads(fleet: Fleet) -> None:
    handle = fleet.celery.send_task("interop.add", (2, 3), queue=fleet.queue)
    assert handle.get(timeout=WAIT) == 5
    stats = _inspect(fleet, fleet.prefork).stats()
    got = stats[fleet.prefork]
    for key in ("total", "pid", "uptime", "rusage", "broker", "prefetch_count", "pool", "clock"):
        assert key in got, key
    assert got["pool"]["max-concurrency"] == 2
    assert len(got["pool"]["processes"]) == 2
    assert got["pid"] == fleet.workers[fleet.prefork].pid
    assert got["broker"]["transport"] == ("redis" if fleet.broker == "redis" else "rabbitmq")
    assert "utime" in got["rusage"]
    both = {**stats, **_inspect(fleet, fleet.threads).stats()}
    assert sum(s["total"].get("interop.add", 0) for s in both.values()) >= 1


def test_registered_active_queues_conf_and_report(fleet: Fleet) -> None:
    inspect = _inspect(fleet, fleet.threads)
    assert "interop.add" in inspect.registered()[fleet.threads]
    (queue,) = inspect.active_queues()[fleet.threads]
    assert queue["name"] == fleet.queue
    conf = inspect.conf()[fleet.threads]
    assert conf["worker_name"] == fleet.threads
    assert "software -> millpond" in inspect.report()[fleet.threads]["ok"]
    assert inspect.scheduled() == {fleet.threads: []}


def test_active_lists_a_running_task_and_query_task_finds_it(fleet: Fleet) -> None:
    gate = f"interop:gate:{uuid.uuid4().hex}"
    handle = fleet.celery.send_task("interop.gate", (gate, 7), queue=fleet.queue)
    try:

        def running() -> dict[str, Any] | None:
            for node in (fleet.prefork, fleet.threads):
                for info in _inspect(fleet, node).active()[node]:
                    if info["id"] == handle.id:
                        return {"node": node, **info}
            return None

        found = wait_until(running, WAIT, lambda: f"task {handle.id} in active\n{fleet.logs()}")
        assert found["name"] == "interop.gate"
        assert found["args"] == [gate, 7]
        assert found["time_start"] is not None
        queried = _inspect(fleet, found["node"]).query_task(handle.id)[found["node"]]
        assert queried[handle.id][0] == "active"
    finally:
        sink.client().rpush(gate, "open")
    assert handle.get(timeout=WAIT) == 7


def test_active_safe_shows_the_producers_argsrepr(fleet: Fleet) -> None:
    # Flower asks `active(safe=True)`; Celery then shows the message's argsrepr/kwargsrepr, which
    # producers set to keep secrets off dashboards, never the arguments themselves
    gate = f"interop:gate:{uuid.uuid4().hex}"
    handle = fleet.celery.send_task(
        "interop.gate", (gate, 7), queue=fleet.queue, argsrepr="(<gate>, <hidden>)", kwargsrepr="{}"
    )
    try:

        def running() -> dict[str, Any] | None:
            for node in (fleet.prefork, fleet.threads):
                for info in _inspect(fleet, node).active(safe=True)[node]:
                    if info["id"] == handle.id:
                        return dict(info)
            return None

        found = wait_until(running, WAIT, lambda: f"task {handle.id} in active\n{fleet.logs()}")
        assert found["args"] == "(<gate>, <hidden>)"
        assert found["kwargs"] == "{}"
    finally:
        sink.client().rpush(gate, "open")
    assert handle.get(timeout=WAIT) == 7


def test_revoke_before_the_countdown_holds(fleet: Fleet) -> None:
    key = f"interop:revoked:{uuid.uuid4().hex}"
    handle = fleet.celery.send_task("interop.record", (1, key), queue=fleet.queue, countdown=3)
    replies = fleet.celery.control.revoke(handle.id, reply=True, timeout=5.0)
    assert {fleet.prefork: {"ok": f"tasks {{'{handle.id}'}} flagged as revoked"}} in replies
    # REVOKED with Celery's meta, at once (the workers mark it) and after the countdown
    assert fleet.celery.AsyncResult(handle.id).state == "REVOKED"
    wait_until(
        lambda: any(fleet.logged(n, "discarding a revoked task", handle.id) for n in fleet.workers),
        WAIT,
        lambda: f"a worker to discard {handle.id} once its countdown ended\n{fleet.logs()}",
    )
    assert sink.client().lrange(key, 0, -1) == []
    from celery.exceptions import TaskRevokedError

    with pytest.raises(TaskRevokedError):
        fleet.celery.AsyncResult(handle.id).get(timeout=WAIT)
    listed = _inspect(fleet, fleet.threads).revoked()[fleet.threads]
    assert handle.id in listed


def test_revoke_by_stamped_header_holds(fleet: Fleet) -> None:
    stamp = uuid.uuid4().hex
    replies = fleet.celery.control.revoke_by_stamped_headers(
        {"batch": stamp}, reply=True, timeout=5.0, destination=[fleet.prefork, fleet.threads]
    )
    assert len(replies) == 2
    assert all("flagged as revoked" in next(iter(r.values()))["ok"] for r in replies)
    key = f"interop:stamped:{uuid.uuid4().hex}"
    handle = fleet.celery.send_task(
        "interop.record", (1, key), queue=fleet.queue, stamped_headers=["batch"], batch=stamp
    )
    wait_until(
        lambda: any(fleet.logged(n, "discarding a revoked task", handle.id) for n in fleet.workers),
        WAIT,
        lambda: f"a worker to discard {handle.id} by its stamp\n{fleet.logs()}",
    )
    wait_until(  # the log line comes just before the state is stored
        lambda: fleet.celery.AsyncResult(handle.id).state == "REVOKED",
        WAIT,
        lambda: f"{handle.id} REVOKED\n{fleet.logs()}",
    )
    assert sink.client().lrange(key, 0, -1) == []


def _running_on(fleet: Fleet, node: str, gate: str) -> Any:
    """Send gate tasks until one runs on `node` (the others are opened at the end)."""
    handles = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        handle = fleet.celery.send_task("interop.gate", (gate, 1), queue=fleet.queue)
        handles.append(handle)

        def active_on(task_id: str = handle.id) -> str | None:
            for name in (fleet.prefork, fleet.threads):
                if any(i["id"] == task_id for i in _inspect(fleet, name).active()[name]):
                    return name
            return None

        where = wait_until(active_on, WAIT, f"{handle.id} to start")
        if where == node:
            return handle, handles
    raise AssertionError(f"no task started on {node} within {WAIT}s")


def test_revoke_terminate_stops_a_running_task_on_prefork(fleet: Fleet) -> None:
    gate = f"interop:gate:{uuid.uuid4().hex}"
    try:
        handle, _ = _running_on(fleet, fleet.prefork, gate)
        replies = fleet.celery.control.revoke(
            handle.id, terminate=True, signal="SIGKILL", reply=True, timeout=5.0,
            destination=[fleet.prefork],
        )  # fmt: skip
        assert replies == [{fleet.prefork: {"ok": f"terminate: {handle.id}"}}]
        wait_until(
            lambda: fleet.celery.AsyncResult(handle.id).state == "REVOKED",
            WAIT,
            lambda: f"{handle.id} REVOKED\n{fleet.logs()}",
        )
        from celery.exceptions import TaskRevokedError

        meta = fleet.celery.backend.get_task_meta(handle.id)
        assert isinstance(meta["result"], TaskRevokedError)  # Celery rebuilt it from the meta
    finally:
        for _ in range(8):
            sink.client().rpush(gate, "open")


def test_terminate_on_threads_says_it_cannot(fleet: Fleet) -> None:
    gate = f"interop:gate:{uuid.uuid4().hex}"
    try:
        handle, _ = _running_on(fleet, fleet.threads, gate)
        replies = fleet.celery.control.terminate(
            handle.id, reply=True, timeout=5.0, destination=[fleet.threads]
        )
        (reply,) = replies
        error = reply[fleet.threads]["error"]
        assert "threads pool cannot stop a running task" in error
    finally:
        for _ in range(8):
            sink.client().rpush(gate, "open")
    assert handle.get(timeout=WAIT) == 1  # it ran to the end, as the reply said


def test_control_cli_revoke_and_an_unknown_command(fleet: Fleet) -> None:
    task_id = str(uuid.uuid4())
    done = fleet.celery_cli("control", "revoke", task_id, "-d", fleet.threads, "--timeout", "5")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "flagged as revoked" in done.stdout
    replies = fleet.celery.control.broadcast(
        "no_such_command", reply=True, timeout=5.0, destination=[fleet.threads]
    )
    assert "unknown command" in replies[0][fleet.threads]["error"]


def test_celery_add_consumer_binds_by_default_and_a_custom_binding_is_refused(fleet: Fleet) -> None:
    control, node = fleet.celery.control, fleet.prefork
    extra = f"{fleet.queue}-extra"
    replies = control.add_consumer(
        extra, exchange="orders", exchange_type="topic", routing_key="order.*", reply=True,
        destination=[node], timeout=5.0,
    )  # fmt: skip
    assert "exchange='orders'" in replies[0][node]["error"]
    replies = control.add_consumer(extra, reply=True, destination=[node], timeout=5.0)
    assert replies == [{node: {"ok": f"add consumer {extra}"}}]
    handle = fleet.celery.send_task("interop.add", (20, 22), queue=extra)
    assert handle.get(timeout=WAIT) == 42
    replies = control.cancel_consumer(extra, reply=True, destination=[node], timeout=5.0)
    assert replies == [{node: {"ok": f"no longer consuming from {extra}"}}]
    wait_until(
        lambda: [q["name"] for q in _inspect(fleet, node).active_queues()[node]] == [fleet.queue],
        WAIT,
        lambda: f"{node} to consume {fleet.queue} only again\n{fleet.logs()}",
    )


def test_shutdown_stops_the_worker_warm(fleet: Fleet) -> None:
    """Last in the module: it stops the threads worker."""
    done = fleet.celery_cli("control", "shutdown", "-d", fleet.threads, "--timeout", "5")
    assert done.returncode == 0, done.stdout + done.stderr
    worker = fleet.workers[fleet.threads]
    assert worker.wait(WAIT) == 0
    assert any(line.get("event") == "worker stopped" for line in worker.lines())
    assert fleet.celery.control.ping(destination=[fleet.threads], timeout=1.0) == []
    assert fleet.celery.control.ping(destination=[fleet.prefork], timeout=5.0) == [
        {fleet.prefork: {"ok": "pong"}}
    ]


def test_millpond_callers_reach_celery_workers_too(fleet: Fleet) -> None:
    from millpond import Millpond

    app = Millpond("ops", broker_url=BROKERS[fleet.broker], control={"exchange": fleet.namespace})
    try:
        assert app.control.inspect([fleet.celery_node], timeout=5.0).ping() == {
            fleet.celery_node: {"ok": "pong"}
        }
        task_id = str(uuid.uuid4())
        replies = app.control.revoke(task_id, reply=True, timeout=5.0)
        nodes = {node for reply in replies or [] for node in reply}
        assert {fleet.celery_node, fleet.prefork} <= nodes
        listed = app.control.inspect([fleet.celery_node], timeout=5.0).revoked()
        assert listed is not None and task_id in listed[fleet.celery_node]
    finally:
        app.close()


def test_millpond_cli_speaks_to_the_same_workers(fleet: Fleet) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "millpond", "inspect", "ping", "-d", fleet.prefork, "-t", "5"],
        cwd=ROOT,
        env={
            **os.environ,
            "MILLPOND_BROKER_URL": BROKERS[fleet.broker],
            "MILLPOND_CONTROL__EXCHANGE": fleet.namespace,
        },
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"->  {fleet.prefork}: OK" in done.stdout
    assert "pong" in done.stdout
