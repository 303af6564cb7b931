"""Celery's event dicts, the Lamport clock and the emitter's batching and bounds, without a broker
(the interop suite checks the same events through real brokers with Celery's own receiver)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from millpond.contracts.pool import Job, Outcome
from millpond.exceptions import TaskRevokedError, WorkerLostError
from millpond.states import TaskState
from millpond_control import events
from millpond_control.client import Clock as LamportClock
from millpond_control.emitter import Emitter


def job(**fields: Any) -> Job:
    base: dict[str, Any] = {
        "task_id": "id-1",
        "task_name": "shop.add",
        "args": (2, 3),
        "kwargs": {"z": 1},
    }
    base.update(fields)
    return Job(**base)


# -- the dicts --------------------------------------------------------------------------------------


def test_task_received_carries_celerys_fields() -> None:
    eta = 1_800_000_000.0
    j = job(
        root_id="root", parent_id="parent", retries=2, eta=eta, expires=eta + 60,
        headers={"argsrepr": "(2, 3)", "kwargsrepr": "{'z': 1}"},
    )  # fmt: skip
    fields = events.received(j)
    assert fields.pop("type") == "task-received"
    assert abs(fields.pop("timestamp") - time.time()) < 5
    assert fields == {
        "hostname": None,
        "utcoffset": None,
        "pid": None,
        "clock": None,
        "uuid": "id-1",
        "name": "shop.add",
        "args": "(2, 3)",
        "kwargs": "{'z': 1}",
        "root_id": "root",
        "parent_id": "parent",
        "retries": 2,
        "eta": "2027-01-15T08:00:00+00:00",
        "expires": "2027-01-15T08:01:00+00:00",
    }


def test_received_without_producer_reprs_makes_them() -> None:
    fields = events.received(job())
    assert fields["args"] == "(2, 3)"
    assert fields["kwargs"] == "{'z': 1}"
    assert fields["eta"] is None
    assert fields["expires"] is None


def own(event: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(type, the fields of the event's own) of an event not yet stamped."""
    skip = {"hostname", "utcoffset", "pid", "clock", "timestamp", "type"}
    return event["type"], {k: v for k, v in event.items() if k not in skip}


def test_finished_maps_each_outcome_to_its_event() -> None:
    ok = Outcome(TaskState.SUCCESS, result={"total": 5}, runtime=0.25)
    assert own(events.finished(job(), ok)) == (
        "task-succeeded",
        {"uuid": "id-1", "result": "{'total': 5}", "runtime": 0.25},
    )
    try:
        raise ValueError("boom")
    except ValueError as exc:
        failed = Outcome.of(exc, runtime=0.5)
    kind, fields = own(events.finished(job(), failed))
    assert kind == "task-failed"
    assert fields["exception"] == "ValueError('boom')"
    assert "Traceback" in fields["traceback"] and "ValueError: boom" in fields["traceback"]
    assert fields["runtime"] == 0.5
    retry = Outcome(TaskState.RETRY, exc_type="Retry", exc_message="again", countdown=1)
    assert events.finished(job(), retry)["type"] == "task-retried"
    assert events.finished(job(), retry)["exception"] == "Retry('again')"
    rejected = Outcome(TaskState.REJECTED, requeue=True)
    assert own(events.finished(job(), rejected)) == (
        "task-rejected",
        {"uuid": "id-1", "requeue": True},
    )
    lost = Outcome.of(WorkerLostError("the child died"), TaskState.LOST)
    assert events.finished(job(), lost)["exception"] == "WorkerLostError('the child died')"


def test_revoked_says_whether_it_expired_or_was_stopped() -> None:
    expired = job(expires=time.time() - 1)
    revoked = Outcome.of(TaskRevokedError("expired"), TaskState.REVOKED)
    assert own(events.finished(expired, revoked))[1] == {
        "uuid": "id-1", "terminated": False, "signum": None, "expired": True,
    }  # fmt: skip
    running = job()
    running.started = time.monotonic()
    terminated = Outcome.of(TaskRevokedError("terminated"), TaskState.REVOKED)
    assert events.finished(running, terminated)["terminated"] is True


def test_result_repr_is_cut_and_never_raises() -> None:
    big = list(range(100_000))
    text = events.short_repr(big)
    assert len(text) <= events.RESULT_REPR_MAX

    class Bad:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert "Bad" in events.short_repr(Bad())


def test_stamp_orders_fields_as_celerys_dispatcher() -> None:
    pending = events.started(job())
    event = events.stamp(pending, "w1@host", -1.0, 42, 7)
    assert list(event) == ["hostname", "utcoffset", "pid", "clock", "uuid", "timestamp", "type"]
    assert event["type"] == "task-started"
    assert events.routing_key("task-succeeded") == "task.succeeded"
    assert events.routing_key("worker-heartbeat") == "worker.heartbeat"


def test_worker_event_fields() -> None:
    fields = events.worker_event(
        "worker-heartbeat", freq=2.0, active=3, processed=10,
        software=events.software_info("1.2.3"),
    )  # fmt: skip
    assert fields["type"] == "worker-heartbeat"
    assert fields["freq"] == 2.0
    assert fields["active"] == 3
    assert fields["processed"] == 10
    assert len(fields["loadavg"]) == 3
    assert fields["sw_ident"] == "millpond"
    assert fields["sw_ver"] == "1.2.3"
    assert fields["sw_sys"]


# -- the emitter ------------------------------------------------------------------------------------


class Recorder:
    """Stands in for the broker's publish: records messages, or refuses them while `down`."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, Any]] = []
        self.down = False
        self.cond = threading.Condition()

    def __call__(self, key: str, body: bytes) -> None:
        if self.down:
            raise ConnectionError("broker away")
        with self.cond:
            self.messages.append((key, json.loads(body)))
            self.cond.notify_all()

    def events(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for _, body in list(self.messages):
            out.extend(body if isinstance(body, list) else [body])
        return out

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: predicate(self.events()), timeout):
                raise AssertionError(f"timed out; got {self.events()}")


def emitter(recorder: Recorder, **options: Any) -> Emitter:
    def worker_event(kind: str) -> events.Pending:
        return events.worker_event(
            kind, freq=options.get("freq", 60.0), active=0, processed=0,
            software=events.software_info("0"),
        )  # fmt: skip

    options.setdefault("freq", 60.0)
    return Emitter(
        recorder, hostname="w1@host", clock=LamportClock(), worker_event=worker_event, **options
    )


def types(evs: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in evs]


def test_online_tasks_offline_in_order_with_rising_clock() -> None:
    rec = Recorder()
    em = emitter(rec, interval=0.01)
    em.start()
    rec.wait_for(lambda evs: "worker-online" in types(evs))
    for i in range(3):
        em.put(events.started(job(task_id=f"t{i}")))
    rec.wait_for(lambda evs: len(evs) >= 4)
    em.stop()
    evs = rec.events()
    assert types(evs)[0] == "worker-online"
    assert types(evs)[-1] == "worker-offline"
    assert [e["uuid"] for e in evs if e["type"] == "task-started"] == ["t0", "t1", "t2"]
    clocks = [e["clock"] for e in evs]
    assert clocks == sorted(clocks)
    assert len(set(clocks)) == len(clocks)
    assert all(e["hostname"] == "w1@host" for e in evs)


def test_many_events_go_as_task_multi_batches() -> None:
    rec = Recorder()
    em = emitter(rec, batch=10, interval=0.05)
    for i in range(25):
        em.put(events.started(job(task_id=f"t{i}")))
    em.start()
    rec.wait_for(lambda evs: sum(e["type"] == "task-started" for e in evs) == 25)
    em.stop()
    keys = [k for k, _ in rec.messages]
    assert keys.count("task.multi") == 3  # 10 + 10 + 5
    assert keys[0] == "worker.online"


def test_a_single_event_goes_under_its_own_routing_key() -> None:
    rec = Recorder()
    em = emitter(rec, interval=0.01)
    em.start()
    em.put(events.started(job()))
    rec.wait_for(lambda evs: "task-started" in types(evs))
    em.stop()
    assert ("task.started", rec.messages[1][1]) == rec.messages[1]


def test_heartbeats_every_freq_and_on_request() -> None:
    rec = Recorder()
    em = emitter(rec, freq=0.05, interval=0.01)
    em.start()
    rec.wait_for(lambda evs: types(evs).count("worker-heartbeat") >= 3)
    em.stop()
    beats = [e for e in rec.events() if e["type"] == "worker-heartbeat"]
    assert all(b["freq"] == 0.05 for b in beats)

    rec2 = Recorder()
    slow = emitter(rec2, freq=3600.0, interval=0.01)
    slow.start()
    rec2.wait_for(lambda evs: "worker-online" in types(evs))
    slow.heartbeat_now()
    rec2.wait_for(lambda evs: "worker-heartbeat" in types(evs))
    slow.stop()


def test_a_dead_broker_bounds_memory_and_counts_drops() -> None:
    rec = Recorder()
    rec.down = True
    em = emitter(rec, limit=50, batch=10, interval=0.01)
    em.start()
    for i in range(200):
        em.put(events.started(job(task_id=f"t{i}")))
    assert em.held <= 50
    assert em.dropped == 150
    rec.down = False  # the broker is back: what was kept is sent, in order
    rec.wait_for(lambda evs: sum(e["type"] == "task-started" for e in evs) == 50)
    em.stop()
    sent = [e["uuid"] for e in rec.events() if e["type"] == "task-started"]
    assert sent == [f"t{i}" for i in range(50)]
    assert em.held == 0


def test_stop_is_bounded_when_the_broker_hangs() -> None:
    release = threading.Event()

    def hanging(key: str, body: bytes) -> None:
        release.wait(30)

    em = Emitter(
        hanging,
        hostname="w",
        clock=LamportClock(),
        worker_event=lambda kind: events.worker_event(
            kind, freq=1.0, active=0, processed=0, software={}
        ),
    )
    em.start()
    started = time.monotonic()
    em.stop(timeout=0.2)
    assert time.monotonic() - started < 5
    release.set()


@pytest.mark.parametrize("count", [1, 7])
def test_put_never_blocks_on_a_slow_broker(count: int) -> None:
    gate = threading.Event()

    def slow(key: str, body: bytes) -> None:
        gate.wait(30)

    em = Emitter(
        slow,
        hostname="w",
        clock=LamportClock(),
        worker_event=lambda k: events.worker_event(k, freq=1.0, active=0, processed=0, software={}),
    )
    em.start()
    started = time.monotonic()
    for _ in range(count * 1000):
        em.put(events.started(job()))
    assert time.monotonic() - started < 2
    gate.set()
    em.stop()
