"""After an AMQP reconnect, the count the worker logs is what RabbitMQ then redelivers.

The fault: the link to RabbitMQ is black-holed (`Proxy.stall()`: bytes stop, sockets stay open)
while the worker holds a full prefetch window. Its tasks keep finishing and their acks are
written into the dead socket, which takes them without complaint; none reaches RabbitMQ. When
missed heartbeats give the connection up, the worker must count those deliveries as coming back
(an ack is known delivered only once RabbitMQ answered something sent after it), not as done:
the old code counted them as delivered and logged "redelivers the 0 ... deliveries" while they
all ran again. Every run of a message delivered before is recorded by the task (`nap_counted`),
which is what "observed" counts.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable

import pytest

from millpond.testing.harness import wait_until
from millpond.testing.proxy import Proxy
from tests.faults.harness import Rig

pytestmark = [pytest.mark.fault, pytest.mark.e2e, pytest.mark.amqp]

NAP_COUNTED = "tests.faults.app.nap_counted"
CONCURRENCY = 4
WINDOW = CONCURRENCY * 4  # prefetch_multiplier 4
LOST = re.compile(
    r"RabbitMQ redelivers the (\d+) deliveries it never saw acknowledged "
    r"\((\d+) never acknowledged, (\d+) acknowledged into the lost connection\)"
)


@pytest.mark.slow
def test_the_logged_redelivery_count_matches_what_rabbitmq_redelivers(
    make_rig: Callable[..., Rig],
) -> None:
    with Proxy(("127.0.0.1", 5672)) as proxy:
        rig = make_rig("amqp")
        total = WINDOW + 8
        ids = rig.load(total, NAP_COUNTED, (0.5,))
        worker = rig.spawn(
            "threads",
            CONCURRENCY,
            env={
                "MILLPOND_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{proxy.port}//",
                "MILLPOND_PREFETCH_MULTIPLIER": "4",
            },
        ).wait_ready()
        alive = rig.alive(worker)
        # the window is full (RabbitMQ has sent WINDOW messages) and the first tasks run; no
        # task has finished, so no ack has been written yet
        wait_until(
            lambda: rig.broker.queue_length(rig.queue) == total - WINDOW,
            30,
            f"RabbitMQ to hand the worker its window of {WINDOW}",
        )
        rig.ledger.wait_progress(CONCURRENCY, 30, kind="started", alive=alive)
        assert rig.ledger.progress() == 0, "a task finished before the link was cut"
        proxy.stall()
        # tasks finish behind the black hole: their acks go into a socket that forwards nothing
        rig.ledger.wait_progress(CONCURRENCY, 30, alive=alive)
        line = wait_until(
            lambda: LOST.search(worker.text()), 30, "the worker to give the connection up"
        )
        # the old link dies with what it still holds (the acks): none can reach RabbitMQ late
        proxy.reset()
        proxy.resume()
        rig.ledger.wait_for(ids, 60, alive=alive)
        # every redelivered message runs once more: wait for all of those runs
        logged, never, into_dead = (int(n) for n in line.groups())
        wait_until(
            lambda: sum(rig.ledger.counts("redelivered").values()) >= logged,
            60,
            f"the {logged} redeliveries the worker announced",
            interval=0.05,
        )
        observed = sum(rig.ledger.counts("redelivered").values())
        report = rig.ledger.report("black-holed AMQP link, then reconnected", ids)
        assert not report.missing
        assert len(LOST.findall(worker.text())) == 1, "the connection was lost more than once"
        assert into_dead >= CONCURRENCY, f"no ack went into the dead link: {line.group(0)}"
        assert (logged, never + into_dead) == (observed, logged), (
            f"the worker logged {line.group(0)!r}; RabbitMQ redelivered {observed}"
        )
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.text()[-3000:]
