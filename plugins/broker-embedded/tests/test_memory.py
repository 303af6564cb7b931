"""memory://: the conformance kit, plus join() and the sharing of state by URL."""

from __future__ import annotations

import threading
import time
import uuid
from contextlib import closing

import pytest

from millpond.contracts.backend import ResultMeta
from millpond.exceptions import ConfigurationError, PublishError, TaskError
from millpond.exceptions import TimeoutError as MillpondTimeoutError
from millpond.states import TaskState
from millpond.testing.broker_kit import BrokerContract
from millpond.testing.claims_kit import ClaimsContract
from millpond.wire.protocol import encode_task
from millpond_broker_embedded.memory import MemoryBroker, MemoryResultBackend


class TestMemoryContract(BrokerContract):
    cross_process = False

    @pytest.fixture
    def broker_url(self) -> str:
        return f"memory://kit-{uuid.uuid4().hex[:8]}"

    @pytest.fixture
    def lease_seconds(self) -> float:
        return 0.3  # nothing expires in memory: a short hold still proves nothing is stolen


@pytest.fixture
def url() -> str:
    return f"memory://test-{uuid.uuid4().hex[:8]}"


def failure(task_id: str, exc_type: str, module: str, message: str) -> ResultMeta:
    return ResultMeta(
        task_id=task_id,
        status=TaskState.FAILURE,
        result={"exc_type": exc_type, "exc_module": module, "exc_message": [message]},
        traceback="Traceback (most recent call last):\n  ...",
        name="tests.fails",
    )


def test_brokers_with_the_same_url_share_queues(url: str) -> None:
    producer, worker = MemoryBroker(url), MemoryBroker(url)
    producer.publish("q", encode_task("t", task_id="shared"))
    assert worker.queue_length("q") == 1
    assert MemoryBroker(f"{url}-other").queue_length("q") == 0
    with closing(worker.consumer(["q"], 1)) as consumer:
        got = consumer.fetch(1, 1.0)
        assert [d.message.task_id for d in got] == ["shared"]
        consumer.ack(got)


def test_default_backend_is_the_backend_of_the_same_name(url: str) -> None:
    MemoryBroker(url).default_backend().store(
        ResultMeta(task_id="r1", status=TaskState.SUCCESS, result=3)
    )
    meta = MemoryResultBackend(url).peek("r1")
    assert meta is not None
    assert meta.result == 3
    assert MemoryResultBackend(f"{url}-other").peek("r1") is None


def test_join_waits_for_ready_delayed_and_unacked_messages(url: str) -> None:
    broker = MemoryBroker(url)
    broker.publish("q", encode_task("t"))
    broker.publish("q", encode_task("t"), eta=time.time() + 0.3)
    done = threading.Event()

    def work() -> None:
        with closing(MemoryBroker(url).consumer(["q"], 1)) as consumer:
            handled = 0
            while handled < 2:
                for delivery in consumer.fetch(1, 1.0):
                    consumer.ack([delivery])
                    handled += 1
        done.set()

    worker = threading.Thread(target=work)
    worker.start()
    try:
        broker.join("q", timeout=5.0)
        assert broker.queue_length("q") == 0
    finally:
        worker.join(5.0)
    assert done.is_set()


def test_join_reraises_a_builtin_failure_as_itself(url: str) -> None:
    broker = MemoryBroker(url)
    broker.default_backend().store(failure("f1", "ValueError", "builtins", "bad input 7"))
    with pytest.raises(ValueError, match="bad input 7"):
        broker.join("q", timeout=1.0)
    broker.join("q", timeout=1.0)  # the failure was reported once; the next join is clean


def test_join_rebuilds_an_unknown_failure_as_task_error(url: str) -> None:
    broker = MemoryBroker(url)
    broker.default_backend().store(failure("f2", "BoomError", "nowhere.mod", "it blew"))
    with pytest.raises(TaskError, match="it blew") as info:
        broker.join("q", timeout=1.0)
    assert type(info.value).__name__ == "BoomError"


def test_join_ignores_failures_from_before_the_broker_or_when_not_fail_fast(url: str) -> None:
    MemoryResultBackend(url).store(failure("old", "ValueError", "builtins", "old"))
    broker = MemoryBroker(url)
    broker.join("q", timeout=1.0)
    broker.default_backend().store(failure("new", "KeyError", "builtins", "k"))
    broker.join("q", timeout=1.0, fail_fast=False)


def test_join_raises_when_a_failure_is_stored_while_waiting(url: str) -> None:
    broker = MemoryBroker(url)
    broker.publish("q", encode_task("t"))  # never consumed: only the failure can end the wait
    timer = threading.Timer(
        0.1, broker.default_backend().store, [failure("f3", "ZeroDivisionError", "builtins", "x")]
    )
    timer.start()
    try:
        start = time.monotonic()
        with pytest.raises(ZeroDivisionError):
            broker.join("q", timeout=5.0)
        assert time.monotonic() - start < 1.0
    finally:
        timer.cancel()
        broker.purge("q")


def test_join_times_out_naming_the_queue_and_what_is_left(url: str) -> None:
    broker = MemoryBroker(url)
    broker.publish("stuck", encode_task("t"))
    start = time.monotonic()
    with pytest.raises(MillpondTimeoutError, match=r"'stuck'.*1 ready, 0 delayed and 0 unacked"):
        broker.join("stuck", timeout=0.2)
    assert time.monotonic() - start < 1.0


def test_headers_a_real_broker_could_not_carry_are_refused(url: str) -> None:
    message = encode_task("t")
    message.headers["when"] = object()
    with pytest.raises(PublishError, match="JSON-compatible"):
        MemoryBroker(url).publish("q", message)
    assert MemoryBroker(url).queue_length("q") == 0


def test_options_and_bad_urls_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="takes no options"):
        MemoryBroker("memory://", {"lease_timeout": 1})
    with pytest.raises(ConfigurationError, match="not a memory:// URL"):
        MemoryBroker("redis://localhost")
    with pytest.raises(ConfigurationError, match="takes no options"):
        MemoryBroker("memory://x?lease_timeout=1")


def test_published_message_is_a_copy(url: str) -> None:
    broker = MemoryBroker(url)
    message = encode_task("t", task_id="copy")
    broker.publish("q", message)
    message.headers["task"] = "changed"
    with closing(broker.consumer(["q"], 1)) as consumer:
        (delivery,) = consumer.fetch(1, 1.0)
        assert delivery.message.task_name == "t"
        consumer.ack([delivery])


class TestMemoryClaims(ClaimsContract):
    cross_process = False

    @pytest.fixture
    def broker_url(self) -> str:
        return f"memory://claims-{uuid.uuid4().hex[:8]}"
