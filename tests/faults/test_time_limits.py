"""A task over its hard time limit: the prefork child is stopped and replaced, the task fails with
TimeLimitExceeded (stored), and its message is acknowledged: a time limit is a result, not a
fault to redeliver. A pool that cannot enforce the limit says so instead of dropping it."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from millpond.states import TaskState
from millpond.testing.harness import wait_until
from millpond.wire.protocol import encode_task
from tests.faults.harness import NAP, Rig, prefork_children

pytestmark = [pytest.mark.fault, pytest.mark.e2e, pytest.mark.redis]


def test_hard_time_limit_fails_the_task_once_and_the_worker_goes_on(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig("redis", MILLPOND_IGNORE_RESULT="false", MILLPOND_PREFORK__KILL_GRACE="0.2")
    worker = rig.spawn("prefork", 2).wait_ready()
    children = set(prefork_children(worker.pid))
    slow = encode_task(NAP, [30.0], task_id="over-the-limit", time_limit=0.5)
    rig.publish_messages([slow])
    backend = rig.producer.backend
    assert backend is not None
    meta = wait_until(
        lambda: (m := backend.peek("over-the-limit")) and m.status == TaskState.FAILURE and m,
        20,
        "the task to fail on its time limit",
    )
    print(f"stored: {meta.status} {meta.result}")
    assert meta.result["exc_type"] == "TimeLimitExceeded"
    after = rig.publish(20, NAP, (0.01,))
    rig.ledger.wait_for(after, 20, alive=rig.alive(worker))
    assert rig.ledger.counts("started")["over-the-limit"] == 1, "the timed-out task ran again"
    assert rig.ledger.counts("done")["over-the-limit"] == 0
    assert rig.broker.queue_length(rig.queue) == 0
    assert not rig.dead_letters()
    wait_until(
        lambda: (
            len(prefork_children(worker.pid)) == 2 and set(prefork_children(worker.pid)) != children
        ),
        10,
        "the stopped child to be replaced",
    )

    def logged() -> list[dict[str, object]]:
        return [ln for ln in worker.lines() if ln.get("event") == "task over its hard time limit"]

    # the line is written before the result is stored, but reaches us through a pipe reader
    wait_until(lambda: bool(logged()), 10, "the hard-time-limit log line")
    assert logged()[0]["task_id"] == "over-the-limit"
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0


def test_a_pool_that_cannot_enforce_a_limit_says_so(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig("redis")
    worker = rig.spawn("threads", 2).wait_ready()
    rig.publish_messages([encode_task(NAP, [0.01], task_id="limited", time_limit=5)])
    rig.ledger.wait_for(["limited"], 20, alive=rig.alive(worker))
    warned = [
        line for line in worker.lines() if "cannot enforce time_limit" in str(line.get("event"))
    ]
    assert warned, worker.text()[-2000:]
    print(warned[0]["event"])
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
