"""The broadcast contract's pure parts: AMQP routing rules, and what a broker without it says."""

from __future__ import annotations

from typing import Any

import pytest

from millpond.contracts.broadcast import Exchange, Listen, routes_to
from millpond.contracts.broker import Broker
from millpond.exceptions import NotSupported


@pytest.mark.parametrize(
    ("binding", "key", "expected"),
    [
        ("worker.#", "worker.heartbeat", True),
        ("worker.#", "worker", True),
        ("worker.#", "task.succeeded", False),
        ("#", "anything.at.all", True),
        ("#", "", True),
        ("*.succeeded", "task.succeeded", True),
        ("*.succeeded", "task.x.succeeded", False),
        ("#.succeeded", "succeeded", True),
        ("#.succeeded", "a.b.succeeded", True),
        ("task.*", "task", False),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c.z", True),
        ("a.#.z", "a.b.c", False),
    ],
)
def test_topic_routing_follows_amqp(binding: str, key: str, expected: bool) -> None:
    assert routes_to("topic", binding, key) is expected


def test_direct_and_fanout_routing() -> None:
    assert routes_to("direct", "oid", "oid")
    assert not routes_to("direct", "oid", "other")
    assert routes_to("fanout", "", "whatever")


def test_exchange_and_listen_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="kind"):
        Exchange("x", "headers")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        Exchange("")
    with pytest.raises(ValueError, match="durable"):
        Listen("q", Exchange("x"), durable=True, exclusive=True)


def test_a_broker_without_exchanges_says_what_to_use() -> None:
    class Plain(Broker):
        def close(self) -> None: ...
        def declare(self, queues: Any) -> None: ...
        def publish(self, queue: str, message: Any, *, eta: float | None = None) -> None: ...
        def consumer(self, queues: Any, prefetch: int) -> Any: ...
        def purge(self, queue: str) -> int:
            return 0

    broker = Plain("plain://")
    assert broker.supports_broadcast is False
    with pytest.raises(NotSupported, match="remote control and events are not available"):
        broker.listen(Listen("q", Exchange("x")))
