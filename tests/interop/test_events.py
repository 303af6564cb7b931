"""Celery's own event receiver (celery 5.7's `EventReceiver` and `events.State`, what Flower is made
of) reads a `millpond worker`'s events on Redis and on RabbitMQ: worker-online, heartbeats and
worker-offline with Celery's fields, and each task event with the fields Celery's worker sends."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.interop.conftest import BROKERS, REDIS, WAIT, Worker, _delete_queues, wait_until
from tests.interop.monitor import Capture

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.slow]

#: fields every event carries (Celery's dispatcher adds them to each)
ENVELOPE = {"type", "hostname", "timestamp", "utcoffset", "pid", "clock"}
WORKER_FIELDS = ENVELOPE | {
    "freq",
    "active",
    "processed",
    "loadavg",
    "sw_ident",
    "sw_ver",
    "sw_sys",
}
BEAT = 0.5


@dataclass
class Fleet:
    broker: str
    capture: Capture
    worker: Worker
    hostname: str
    queue: str
    producer: Any

    def send(self, name: str, *args: Any, **options: Any) -> str:
        result = self.producer.send_task(f"interop.{name}", args, queue=self.queue, **options)
        return str(result.id)


def start_worker(
    broker_url: str, queue: str, hostname: str, log: Path, *extra: str, **env: str
) -> Worker:
    cmd = [
        sys.executable, "-m", "millpond", "worker", "--no-banner",
        "-A", "tests.interop.events_app:app", "-P", "threads", "-c", "4", "-n", hostname, *extra,
    ]  # fmt: skip
    return Worker(
        "millpond",
        cmd,
        {
            "MILLPOND_BROKER_URL": broker_url,
            "MILLPOND_RESULT_BACKEND": REDIS,
            "MILLPOND_QUEUES": queue,
            "MILLPOND_DEFAULT_QUEUE": queue,
            "MILLPOND_LOG_FORMAT": "json",
            "MILLPOND_EVENTS__HEARTBEAT_INTERVAL": str(BEAT),
            **env,
        },
        log,
    )


@pytest.fixture(scope="module", params=["redis", pytest.param("amqp", marks=pytest.mark.amqp)])
def fleet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    from tests.interop.celery_app import make_app

    broker = request.param
    tag = uuid.uuid4().hex[:10]
    queue, hostname = f"events-{tag}", f"events-{tag}@interop"
    capture = Capture(BROKERS[broker]).start()
    producer = make_app(BROKERS[broker], REDIS, queue)
    logs = tmp_path_factory.mktemp(f"events-{broker}")
    worker = start_worker(BROKERS[broker], queue, hostname, logs / "millpond.log", "-E")
    try:
        capture.wait_for(
            lambda evs: worker.check_alive() or capture.of(hostname, "worker-online"),
            WAIT,
            lambda: f"worker-online from {hostname}\n{worker.text()[-4000:]}",
        )
        yield Fleet(broker, capture, worker, hostname, queue, producer)
    finally:
        worker.stop()
        capture.stop()
        producer.close()
        _delete_queues(broker, [queue])


def test_worker_online_and_heartbeats_carry_celerys_fields(fleet: Fleet) -> None:
    online = fleet.capture.of(fleet.hostname, "worker-online")[0]
    assert set(online) >= WORKER_FIELDS, sorted(WORKER_FIELDS - set(online))
    assert online["sw_ident"] == "millpond"
    assert online["freq"] == BEAT
    assert online["pid"] == fleet.worker.proc.pid
    assert len(online["loadavg"]) == 3
    assert isinstance(online["clock"], int)
    beats = fleet.capture.wait_for(
        lambda evs: (b := fleet.capture.of(fleet.hostname, "worker-heartbeat"))[1:] and b,
        WAIT,
        "two heartbeats",
    )
    assert set(beats[0]) >= WORKER_FIELDS
    assert beats[1]["clock"] > beats[0]["clock"] > online["clock"]
    # Celery's own state machine counts the worker as alive, with the software it reports
    with fleet.capture.cond:
        seen = fleet.capture.state.workers[fleet.hostname]
        assert seen.alive
        assert seen.sw_ident == "millpond"
        assert seen.freq == BEAT


def test_a_task_that_succeeds(fleet: Fleet) -> None:
    task_id = fleet.send("add", 2, 3)
    received = fleet.capture.task_event(task_id, "task-received", WAIT)
    started = fleet.capture.task_event(task_id, "task-started", WAIT)
    succeeded = fleet.capture.task_event(task_id, "task-succeeded", WAIT)
    assert ENVELOPE | {
        "uuid", "name", "args", "kwargs", "root_id", "parent_id", "retries", "eta", "expires",
    } <= set(received)  # fmt: skip
    assert received["name"] == "interop.add"
    assert received["args"] == "(2, 3)"
    assert received["kwargs"] == "{}"
    assert received["retries"] == 0
    assert received["root_id"] == task_id
    assert received["eta"] is None
    assert ENVELOPE | {"uuid"} <= set(started)
    assert succeeded["result"] == "5"
    assert succeeded["runtime"] > 0
    assert received["clock"] < started["clock"] < succeeded["clock"]
    assert {e["hostname"] for e in (received, started, succeeded)} == {fleet.hostname}
    with fleet.capture.cond:
        task = fleet.capture.state.tasks[task_id]
        assert task.state == "SUCCESS"
        assert task.name == "interop.add"
        assert task.worker.hostname == fleet.hostname
        assert task.runtime == succeeded["runtime"]


def test_a_task_that_fails(fleet: Fleet) -> None:
    task_id = fleet.send("boom", "x")
    failed = fleet.capture.task_event(task_id, "task-failed", WAIT)
    assert failed["exception"] == "ValueError('boom x')"
    assert "ValueError: boom x" in failed["traceback"]
    with fleet.capture.cond:
        assert fleet.capture.state.tasks[task_id].state == "FAILURE"
        assert fleet.capture.state.tasks[task_id].exception == "ValueError('boom x')"


def test_a_task_that_retries(fleet: Fleet) -> None:
    task_id = fleet.send("retry_once", "v")
    retried = fleet.capture.task_event(task_id, "task-retried", WAIT)
    assert retried["exception"] == "KeyError('not yet')"
    # the retry is a new message of the same task: received again, with retries counted
    fleet.capture.wait_for(
        lambda evs: any(
            e.get("uuid") == task_id and e["type"] == "task-received" and e["retries"] == 1
            for e in evs
        ),
        WAIT,
        "the retry's task-received",
    )
    succeeded = fleet.capture.task_event(task_id, "task-succeeded", WAIT)
    assert succeeded["result"] == "'v'"


def test_a_task_that_rejects_its_message(fleet: Fleet) -> None:
    task_id = fleet.send("reject", "not for us")
    rejected = fleet.capture.task_event(task_id, "task-rejected", WAIT)
    assert rejected["requeue"] is False


def test_an_expired_task_is_revoked(fleet: Fleet) -> None:
    task_id = fleet.send("add", 1, 1, expires=datetime.now(UTC) - timedelta(seconds=30))
    revoked = fleet.capture.task_event(task_id, "task-revoked", WAIT)
    assert revoked["expired"] is True
    assert revoked["terminated"] is False
    received = fleet.capture.task_event(task_id, "task-received", WAIT)
    assert received["expires"] is not None
    with fleet.capture.cond:
        assert fleet.capture.state.tasks[task_id].state == "REVOKED"


def test_many_tasks_arrive_batched_and_each_once(fleet: Fleet) -> None:
    ids = [fleet.send("add", i, i) for i in range(200)]
    fleet.capture.wait_for(
        lambda evs: {e["uuid"] for e in evs if e["type"] == "task-succeeded"} >= set(ids),
        WAIT,
        "200 task-succeeded events",
    )
    with fleet.capture.cond:
        succeeded = [
            e for e in fleet.capture.events if e["type"] == "task-succeeded" and e["uuid"] in ids
        ]
        clocks = [e["clock"] for e in fleet.capture.of(fleet.hostname)]
    assert len(succeeded) == 200  # each once
    assert len(set(clocks)) == len(clocks)  # one Lamport time per event


def test_worker_offline_when_it_stops_and_events_can_be_switched_off(
    tmp_path: Path, fleet: Fleet
) -> None:
    tag = uuid.uuid4().hex[:10]
    queue, hostname = f"events-{tag}", f"events-{tag}@interop"
    worker = start_worker(BROKERS[fleet.broker], queue, hostname, tmp_path / "w.log")
    quiet = start_worker(
        BROKERS[fleet.broker], queue, f"quiet-{tag}@interop", tmp_path / "quiet.log",
        MILLPOND_EVENTS__ENABLED="false",
    )  # fmt: skip
    try:
        fleet.capture.wait_for(
            lambda evs: worker.check_alive() or fleet.capture.of(hostname, "worker-online"),
            WAIT,
            "worker-online",
        )
        wait_until(
            lambda: quiet.check_alive() or "worker ready" in quiet.text(),
            WAIT,
            lambda: f"the switched-off worker to start\n{quiet.text()[-3000:]}",
        )
        # without -E no task events are sent, only the worker's own
        task_id = fleet.producer.send_task("interop.add", (1, 2), queue=queue).get(timeout=WAIT)
        assert task_id == 3
        worker.stop()
        quiet.stop()
        offline = fleet.capture.wait_for(
            lambda evs: fleet.capture.of(hostname, "worker-offline"), WAIT, "worker-offline"
        )[0]
        assert set(offline) >= WORKER_FIELDS
        with fleet.capture.cond:
            assert not fleet.capture.state.workers[hostname].alive
        assert not [e for e in fleet.capture.of(hostname) if e["type"].startswith("task-")]
        # the switched-off worker said nothing at all
        assert not fleet.capture.of(f"quiet-{tag}@interop")
        assert quiet.proc.returncode == 0
    finally:
        worker.stop()
        quiet.stop()
        _delete_queues(fleet.broker, [queue])


def test_millpond_events_prints_what_the_worker_sends(fleet: Fleet) -> None:
    """`millpond events` (no Celery needed) reads the same events, batches unpacked."""
    import subprocess

    cmd = [
        sys.executable, "-m", "millpond", "events", "-b", BROKERS[fleet.broker], "--json",
        "--type", "task-*", "--hostname", fleet.hostname, "--limit", "3", "--timeout", str(WAIT),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # printed once it listens
        assert line.startswith("listening for events"), line + proc.stderr.read()
        task_id = fleet.send("add", 20, 22)
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert [(e["type"], e["uuid"]) for e in got] == [
        ("task-received", task_id),
        ("task-started", task_id),
        ("task-succeeded", task_id),
    ]
    assert got[2]["result"] == "42"
    assert got[0]["hostname"] == fleet.hostname


def test_remote_control_turns_task_events_on_and_off(tmp_path: Path, fleet: Fleet) -> None:
    """Celery's `control.enable_events` / `disable_events` / `heartbeat`, as Flower sends them."""
    tag = uuid.uuid4().hex[:10]
    queue, hostname = f"events-{tag}", f"events-{tag}@interop"
    off_name = f"off-{tag}@interop"
    # a heartbeat only when asked for, so the one the `heartbeat` command asks for is told apart
    worker = start_worker(
        BROKERS[fleet.broker], queue, hostname, tmp_path / "w.log",
        MILLPOND_EVENTS__HEARTBEAT_INTERVAL="3600",
    )  # fmt: skip
    switched_off = start_worker(
        BROKERS[fleet.broker], f"{queue}-off", off_name, tmp_path / "off.log",
        MILLPOND_EVENTS__ENABLED="false",
    )  # fmt: skip
    control = fleet.producer.control
    capture = fleet.capture
    try:
        capture.wait_for(
            lambda evs: worker.check_alive() or capture.of(hostname, "worker-online"),
            WAIT,
            "worker-online",
        )
        wait_until(
            lambda: switched_off.check_alive() or "worker ready" in switched_off.text(),
            WAIT,
            "the switched-off worker to start",
        )

        def ask(command: str, name: str) -> Any:
            replies = control.broadcast(command, destination=[name], reply=True, timeout=10)
            return {k: v for reply in replies for k, v in reply.items()}.get(name)

        assert ask("heartbeat", hostname) is None  # Celery's heartbeat answers nothing
        capture.wait_for(
            lambda evs: capture.of(hostname, "worker-heartbeat"), WAIT, "the asked-for heartbeat"
        )
        assert ask("enable_events", hostname) == {"ok": "task events enabled"}
        assert ask("enable_events", hostname) == {"ok": "task events already enabled"}
        first = fleet.producer.send_task("interop.add", (1, 1), queue=queue).id
        capture.task_event(first, "task-succeeded", WAIT)
        assert ask("disable_events", hostname) == {"ok": "task events disabled"}
        quiet = fleet.producer.send_task("interop.add", (2, 2), queue=queue)
        assert quiet.get(timeout=WAIT) == 4
        assert ask("enable_events", hostname) == {"ok": "task events enabled"}
        last = fleet.producer.send_task("interop.add", (3, 3), queue=queue).id
        capture.task_event(last, "task-succeeded", WAIT)
        # one emitter sends in order: had the quiet task made events, they would be here by now
        assert not [e for e in capture.of(hostname) if e.get("uuid") == quiet.id]
        assert "error" in ask("enable_events", off_name)
        assert not capture.of(off_name)
    finally:
        worker.stop()
        switched_off.stop()
        _delete_queues(fleet.broker, [queue, f"{queue}-off"])


def test_a_task_revoked_by_remote_control_sends_task_revoked(fleet: Fleet) -> None:
    task_id = str(uuid.uuid4())
    replies = fleet.producer.control.revoke(
        task_id, destination=[fleet.hostname], reply=True, timeout=10
    )
    assert replies and fleet.hostname in replies[0], replies
    fleet.producer.send_task("interop.add", (1, 2), queue=fleet.queue, task_id=task_id)
    revoked = fleet.capture.task_event(task_id, "task-revoked", WAIT)
    assert revoked["expired"] is False
    assert revoked["terminated"] is False
    with fleet.capture.cond:
        assert fleet.capture.state.tasks[task_id].state == "REVOKED"
