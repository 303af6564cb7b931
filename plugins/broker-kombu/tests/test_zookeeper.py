"""Zookeeper through the generic kombu broker on a private Zookeeper server (Debian's package):
the conformance kit, skipping what the transport declares it cannot do (no delays, a killed
consumer's messages are lost), and the refusal to consume without allow_message_loss."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from millpond.exceptions import ConfigurationError, PublishError
from millpond.testing.broker_kit import BrokerContract, sample_message
from millpond.wire.protocol import encode_task
from millpond_broker_kombu.generic import KombuBroker
from millpond_broker_kombu.link import release
from millpond_broker_kombu.testing import ZookeeperServer


class TestZookeeperContract(BrokerContract):
    @pytest.fixture
    def broker_url(self, zookeeper: ZookeeperServer) -> str:
        return f"zookeeper://127.0.0.1:{zookeeper.port}/kit-{uuid.uuid4().hex[:8]}"

    @pytest.fixture
    def broker_options(self) -> dict[str, Any]:
        return {"allow_message_loss": True, "polling_interval": 0.02}

    @pytest.fixture
    def lease_seconds(self) -> float:
        return 1.0


# -- what the generic broker says about itself ------------------------------------------------------


def test_consuming_without_allow_message_loss_is_refused(zookeeper: ZookeeperServer) -> None:
    broker = KombuBroker(zookeeper.url)
    try:
        with pytest.raises(ConfigurationError, match="allow_message_loss"):
            broker.consumer(["q"], 1)
    finally:
        broker.close()


def test_a_delay_is_refused_with_the_reason(zookeeper: ZookeeperServer) -> None:
    broker = KombuBroker(zookeeper.url, {"allow_message_loss": True})
    try:
        with pytest.raises(PublishError, match="no broker-held delays"):
            broker.publish("q", sample_message(), eta=time.time() + 10)
    finally:
        broker.close()


def test_kombus_own_consumer_reads_what_millpond_wrote(zookeeper: ZookeeperServer) -> None:
    from kombu import Connection

    url = f"zookeeper://127.0.0.1:{zookeeper.port}/interop-{uuid.uuid4().hex[:8]}"
    broker = KombuBroker(url, {"allow_message_loss": True})
    try:
        broker.declare(["shared"])
        sent = encode_task("kit.add", (2, 3), task_id="zk-1")
        broker.publish("shared", sent)
        conn = Connection(url)
        try:
            got = conn.SimpleQueue("shared", no_ack=True).get(timeout=5)
            assert got.headers["id"] == "zk-1"
            assert got.body == sent.body
        finally:
            release(conn)  # kombu's own release leaves the KazooClient running
    finally:
        broker.close()
