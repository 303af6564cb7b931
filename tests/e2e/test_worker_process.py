"""`millpond worker` as a real subprocess on the embedded sqlite:// broker."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from millpond.testing.harness import REDIS_URL, wait_until
from millpond.wire.protocol import DEATH_REASON, Message, encode_task
from tests.e2e.harness import lines_of

pytestmark = pytest.mark.e2e


def test_tasks_sent_from_another_process_run(spawn_worker: Any, producer: Any) -> None:
    from tests.e2e.app import add, fail

    worker = spawn_worker("-P", "solo").wait_ready()
    results = [add.delay(i, i) for i in range(20)]
    assert [r.get(timeout=20) for r in results] == [2 * i for i in range(20)]
    with pytest.raises(ValueError, match="kaputt"):
        fail.delay("kaputt").get(timeout=20)
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_result_that_is_not_json_fails_the_task_for_its_caller(
    spawn_worker: Any, e2e_env: dict[str, str], backend: str
) -> None:
    """The backend refuses the set; the worker stores a TypeError FAILURE in its place, so the
    caller hears why at once (it used to wait for a result that never came) and nothing is lost."""
    from millpond import Millpond

    env = {"MILLPOND_RESULT_BACKEND": REDIS_URL} if backend == "redis" else {}
    producer = Millpond(
        "p",
        broker_url=e2e_env["MILLPOND_BROKER_URL"],
        default_queue=e2e_env["MILLPOND_DEFAULT_QUEUE"],
        **({"result_backend": REDIS_URL} if env else {}),
    )
    worker = spawn_worker("-P", "threads", env=env).wait_ready()
    sent = [producer.send_task("tests.e2e.app.shapeless")]
    try:
        with pytest.raises(TypeError, match="result is not JSON serializable"):
            sent[0].get(timeout=20)
        sent.append(producer.send_task("tests.e2e.app.add", [2, 3]))
        assert sent[1].get(timeout=20) == 5
    finally:
        for result in sent:
            result.forget()
        producer.close()
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert worker.events("task result cannot be stored as JSON"), worker.stderr()[-3000:]


def test_sigterm_finishes_the_task_in_flight_and_acks_it(
    spawn_worker: Any, producer: Any, tmp_path: Path
) -> None:
    from tests.e2e.app import slow

    worker = spawn_worker("-P", "solo").wait_ready()
    first = slow.delay(1.5)
    queued = [slow.delay(0.01) for _ in range(3)]
    wait_until(lambda: lines_of(tmp_path / "started.log"), 20, "the first task to start")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.text()
    assert first.get(timeout=1) == 1.5  # finished during the warm shutdown
    assert lines_of(tmp_path / "finished.log") == [first.id]
    # The queued ones never started and went back to the broker: a new worker runs them, and the
    # finished one is not run again (it was acknowledged).
    spawn_worker("-P", "solo").wait_ready()
    assert [r.get(timeout=20) for r in queued] == [0.01] * 3
    assert lines_of(tmp_path / "started.log").count(first.id) == 1


def test_sigkill_mid_task_loses_nothing(spawn_worker: Any, producer: Any, tmp_path: Path) -> None:
    from tests.e2e.app import slow

    worker = spawn_worker("-P", "solo").wait_ready()
    result = slow.delay(2.0)
    wait_until(lambda: lines_of(tmp_path / "started.log"), 20, "the task to start")
    worker.signal(signal.SIGKILL)
    worker.wait()
    assert lines_of(tmp_path / "finished.log") == []
    restarted = spawn_worker("-P", "solo").wait_ready()
    # The lease of the killed worker (3 s in these tests) expires and the task runs again.
    assert result.get(timeout=30) == 2.0
    assert lines_of(tmp_path / "started.log") == [result.id, result.id]
    restarted.signal(signal.SIGTERM)
    assert restarted.wait() == 0


def test_bad_messages_are_dead_lettered_and_the_worker_goes_on(
    spawn_worker: Any, producer: Any
) -> None:
    from tests.e2e.app import add

    worker = spawn_worker("-P", "solo").wait_ready()
    queue = producer.settings.default_queue
    producer.broker.publish(queue, encode_task("no.such.task", [1], {}))
    producer.broker.publish(queue, Message(body=b"\x00not json", headers=encode_task("x").headers))
    producer.broker.publish(queue, encode_task(add.name, [1], {}))  # wrong number of arguments
    assert add.delay(20, 22).get(timeout=20) == 42
    dead = wait_until(
        lambda: (
            len(producer.broker.dead_letters(queue)) == 3 and producer.broker.dead_letters(queue)
        ),
        10,
        "three dead letters",
    )
    reasons = sorted(m.headers[DEATH_REASON] for m in dead)
    assert any("unknown task 'no.such.task'" in r for r in reasons)
    assert any("not valid" in r for r in reasons)
    assert any("wrong arguments" in r for r in reasons)
    logged = [line for line in worker.lines() if "dead-letter" in str(line.get("event"))]
    assert len(logged) == 3 and all(line.get("reason") for line in logged)


def test_missing_pool_is_a_clear_error(spawn_worker: Any) -> None:
    worker = spawn_worker("-P", "nosuchpool")
    assert worker.wait() == 2
    text = worker.text()
    assert "no pool named 'nosuchpool' is installed (installed: " in text
    assert "solo" in text


def test_bad_setting_is_a_clear_error(spawn_worker: Any) -> None:
    worker = spawn_worker("-P", "solo", env={"MILLPOND_PREFETCH_MULTIPLIER": "many"})
    assert worker.wait() == 2
    assert (
        "setting 'prefetch_multiplier' (env MILLPOND_PREFETCH_MULTIPLIER) has a bad value 'many'"
        in worker.text()
    )


def test_flags_beat_env(spawn_worker: Any, producer: Any) -> None:
    worker = spawn_worker(
        "-P", "solo", "-c", "1", env={"MILLPOND_POOL": "nosuchpool", "MILLPOND_CONCURRENCY": "9"}
    )
    worker.wait_ready()
    ready = next(line for line in worker.lines() if line.get("event") == "worker ready")
    assert ready["pool"] == "solo" and ready["concurrency"] == 1
