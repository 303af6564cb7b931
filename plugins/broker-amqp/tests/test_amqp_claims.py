"""Claims on RabbitMQ (exclusive queues with x-expires, a last-value state queue) pass the claims
conformance kit, with the one difference RabbitMQ imposes: a claim ends with its holder."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import amqp
import pytest

from millpond.testing.claims_kit import ClaimsContract

pytestmark = pytest.mark.amqp

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


class TestAmqpClaims(ClaimsContract):
    @pytest.fixture
    def broker_url(self) -> str:
        return AMQP_URL

    @pytest.fixture
    def key(self) -> Iterator[str]:
        name = f"kit-claim-{uuid.uuid4().hex[:12]}"
        yield name
        conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
        conn.connect()
        try:
            chan = conn.channel()
            for queue in (f"millpond.state.{name}", f"millpond.state.{name}-other"):
                chan.queue_delete(queue)
        finally:
            conn.close()


def test_a_dead_claims_connection_is_replaced_on_the_next_call(key: str) -> None:
    """RabbitMQ closes a connection that sent nothing for two heartbeats (8 s by default): the
    next call opens a new one instead of failing."""
    from millpond.config import plugins

    broker = plugins.broker_for_url(AMQP_URL)
    claims = broker.claims()
    try:
        claims.save_state(key, {"a": "1"})
        claims._conn.transport.sock.shutdown(2)  # type: ignore[attr-defined]  # as the server would
        assert claims.load_state(key) == {"a": "1"}
        assert claims.acquire(key, "me", 5.0)
    finally:
        claims.close()
        broker.close()


@pytest.fixture
def key() -> Iterator[str]:
    name = f"kit-claim-{uuid.uuid4().hex[:12]}"
    yield name
    conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
    conn.connect()
    try:
        conn.channel().queue_delete(f"millpond.state.{name}")
    finally:
        conn.close()
