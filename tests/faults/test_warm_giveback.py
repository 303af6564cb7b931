"""Warm shutdown gives the prefetched, not-yet-started messages back at once.

A worker (threads pool, one slot, prefetch 5) runs a long task with four more messages in its
buffer; a second worker is already up. On SIGTERM the first one must hand the four back to the
broker right away, so the second runs them while the long task is still running: not when the
long task ends and the consumer closes, and not when a lease lapses (60 s here on Redis and the
embedded sqlite broker, so the difference is unambiguous). Nothing runs twice; the long task
finishes where it started.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from millpond.testing.harness import wait_until
from tests.faults.conftest import BROKERS
from tests.faults.harness import NAP, Rig, since

pytestmark = [pytest.mark.fault, pytest.mark.e2e, pytest.mark.slow]

#: the lease (Redis) is far longer than every wait below: a give-back by lapse cannot pass
LEASE = 60
#: the running task outlives the bound on the buffered ones: a give-back at close cannot pass
#: (the give-back itself takes well under a second; the margin is for a loaded machine)
LONG_TASK = 8.0
#: how soon after SIGTERM the second worker must have run the buffered messages
BOUND = 5.0
BUFFERED = 4
GAVE_BACK = "warm shutdown: gave back buffered messages to the broker"


@pytest.mark.parametrize("broker", [*BROKERS, "sqlite"])
def test_sigterm_gives_buffered_messages_to_another_worker_at_once(
    make_rig: Callable[..., Rig], broker: str
) -> None:
    rig = make_rig(
        broker,
        MILLPOND_PREFETCH_MULTIPLIER=str(BUFFERED + 1),
        MILLPOND_REDIS__LEASE_TIMEOUT=str(LEASE),
        MILLPOND_SQLITE__LEASE_TIMEOUT=str(LEASE),
        MILLPOND_SHUTDOWN_TIMEOUT=str(LEASE),
    )
    first = rig.spawn("threads", 1).wait_ready()
    (long_id,) = rig.publish(1, NAP, (LONG_TASK,))
    wait_until(lambda: rig.ledger.counts("started")[long_id], 20, "the long task to start")
    short = rig.publish(BUFFERED, NAP, (0.0,))
    queue, broker_ = rig.queue, rig.broker
    wait_until(
        lambda: broker_.queue_length(queue) == 0,
        20,
        f"the first worker to prefetch the {BUFFERED} short tasks",
    )
    second = rig.spawn("threads", 1).wait_ready()
    alive = rig.alive(first, second)
    assert not set(short) & set(rig.ledger.counts("started")), "a buffered task started early"

    first.signal(signal.SIGTERM)
    termed = time.monotonic()
    rig.ledger.wait_for(short, BOUND, alive=alive)
    took = since(termed)
    print(f"{broker}: {BUFFERED} buffered tasks ran on the second worker {took} s after SIGTERM")
    assert first.proc.poll() is None, "the first worker exited before its long task finished"
    assert not rig.ledger.counts("done")[long_id], (
        "the long task had finished already: the buffered ones may have gone back at the close"
    )

    assert first.wait(LONG_TASK + 30) == 0, first.text()[-3000:]
    given = [line for line in first.lines() if line.get("event") == GAVE_BACK]
    assert [e.get("given_back") for e in given] == [BUFFERED], first.text()[-3000:]
    ids = [long_id, *short]
    report = rig.ledger.report(f"warm give-back on {broker}", ids)
    assert not report.missing
    assert not report.duplicates, "a task ran twice: only a running task may"
    assert rig.ledger.counts("started")[long_id] == 1
    second.signal(signal.SIGTERM)
    assert second.wait(30) == 0, second.text()[-3000:]


@pytest.mark.parametrize("broker", [*BROKERS, "sqlite"])
def test_sigterm_runs_buffered_tasks_acknowledged_on_receipt(
    make_rig: Callable[..., Rig], broker: str
) -> None:
    """With acks_late off a buffered message was acknowledged when it arrived: the broker has it
    no more, so giving it back is not possible and dropping it would lose it; the stopping
    worker runs it before it exits."""
    rig = make_rig(
        broker,
        MILLPOND_ACKS_LATE="false",
        MILLPOND_PREFETCH_MULTIPLIER=str(BUFFERED + 1),
        MILLPOND_SHUTDOWN_TIMEOUT=str(LEASE),
    )
    worker = rig.spawn("threads", 1).wait_ready()
    (long_id,) = rig.publish(1, NAP, (2.0,))
    wait_until(lambda: rig.ledger.counts("started")[long_id], 20, "the long task to start")
    short = rig.publish(BUFFERED, NAP, (0.0,))
    queue, broker_ = rig.queue, rig.broker
    wait_until(
        lambda: broker_.queue_length(queue) == 0,
        20,
        f"the worker to prefetch the {BUFFERED} short tasks",
    )
    worker.signal(signal.SIGTERM)
    assert worker.wait(LEASE) == 0, worker.text()[-3000:]
    report = rig.ledger.report(f"warm stop with acks_late off on {broker}", [long_id, *short])
    assert not report.missing, worker.text()[-3000:]
    assert not report.duplicates
    given = [line for line in worker.lines() if line.get("event") == GAVE_BACK]
    assert [(e.get("given_back"), e.get("kept_to_run")) for e in given] == [(0, BUFFERED)]
