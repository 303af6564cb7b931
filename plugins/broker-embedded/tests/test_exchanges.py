"""The embedded brokers route broadcasts by AMQP's rules."""

from __future__ import annotations

import pytest

from millpond_broker_embedded.exchanges import routes_to


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
