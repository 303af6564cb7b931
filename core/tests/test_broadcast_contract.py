"""The broker contract's pure parts: what it refuses, and what a broker without an optional part
says."""

from __future__ import annotations

from typing import Any

import pytest

from millpond.contracts.broadcast import Exchange, Listen
from millpond.contracts.broker import Broker
from millpond.exceptions import NotSupported


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
    # every other optional part says "cannot" the same way, naming the broker
    with pytest.raises(NotSupported, match="Plain cannot count a queue"):
        broker.queue_stats("q")
    with pytest.raises(NotSupported, match="Plain cannot list dead letters"):
        broker.dead_letters("q")
    with pytest.raises(NotSupported, match="Plain cannot replay dead letters"):
        broker.replay_dead_letters("q")
    with pytest.raises(NotSupported, match=r"cannot hold claims.*redis://"):
        broker.claims()
