"""The redelivery cap: a task's own `max_deliveries` option wins over the setting of that name.

A message handed out more often than its cap is dead-lettered by the receive step before it runs
(the poison that keeps killing its worker); a task without the option keeps the setting's cap.
Real memory-broker deliveries, each requeued to count one more delivery.
"""

from __future__ import annotations

import pytest

from millpond import Millpond
from millpond.config.settings import load_settings
from millpond.consume.receive import Receiver
from millpond.consume.settle import Acks, Settler
from millpond.contracts.broker import Delivery
from millpond.contracts.pool import Capabilities, Outcome
from millpond.exceptions import WorkerLostError
from millpond.states import TaskState
from millpond.wire.protocol import DEATH_REASON


def _delivered(app: Millpond, name: str, times: int) -> tuple[Receiver, Delivery]:
    """A receiver on the app's consumer, and the `times`-th delivery of one `name` message."""
    queue = app.queue_for(name)
    app.send_task(name, [1])
    consumer = app.broker.consumer([queue], 1)
    acks = Acks()
    acks.consumer = consumer
    receiver = Receiver(Settler(app, load_settings({}, env={}), acks), "solo", Capabilities())
    for _ in range(times - 1):
        (delivery,) = consumer.fetch(1, 5)
        consumer.reject(delivery, requeue=True)
    (delivery,) = consumer.fetch(1, 5)
    assert delivery.delivery_count == times
    return receiver, delivery


def test_a_tasks_own_cap_dead_letters_it_before_the_settings_cap(memory_app: Millpond) -> None:
    @memory_app.task(max_deliveries=2)
    def fragile(x: int) -> int:
        return x

    receiver, delivery = _delivered(memory_app, fragile.name, 3)
    assert receiver.receive(delivery) is None
    receiver.acks.flush()
    (dead,) = memory_app.broker.dead_letters(delivery.queue)
    assert "delivered 3 times, over max_deliveries=2" in dead.headers[DEATH_REASON]


def test_a_job_lost_at_the_tasks_own_cap_is_dead_lettered(memory_app: Millpond) -> None:
    """The settle side of the same cap: losing its execution unit on the cap-th delivery
    dead-letters the message (with the setting's 5 it would go back to the queue)."""

    @memory_app.task(max_deliveries=2)
    def fragile(x: int) -> int:
        return x

    receiver, delivery = _delivered(memory_app, fragile.name, 2)
    job = receiver.receive(delivery)
    assert job is not None
    lost = WorkerLostError("child process 1 exited with signal 9 (SIGKILL)")
    receiver.settler.finish(job, Outcome.of(lost, TaskState.LOST))
    receiver.acks.flush()
    (dead,) = memory_app.broker.dead_letters(delivery.queue)
    assert "lost 2 times (max_deliveries=2)" in dead.headers[DEATH_REASON]


def test_without_the_option_the_setting_decides(memory_app: Millpond) -> None:
    @memory_app.task
    def sturdy(x: int) -> int:
        return x

    receiver, delivery = _delivered(memory_app, sturdy.name, 3)  # the setting's cap is 5
    job = receiver.receive(delivery)
    assert job is not None and job.task_name == sturdy.name


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_a_bad_cap_fails_when_the_task_is_declared(memory_app: Millpond, bad: object) -> None:
    with pytest.raises(TypeError, match="'max_deliveries' must be an integer >= 1 or None"):
        memory_app.task(max_deliveries=bad)(lambda: None)  # type: ignore[call-overload]
