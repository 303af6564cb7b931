"""SQS broker on a real SQS API (moto in server mode): the conformance kit, plus what only SQS
has: the visibility heartbeat, long delays in hops, FIFO queues, the redrive policy and the
bytes Celery reads."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from millpond.exceptions import ConfigurationError, PublishError
from millpond.testing.broker_kit import BrokerContract, fetch_until, sample_message
from millpond.wire.protocol import encode_task
from millpond_broker_kombu.sqs import LONG_ETA, SqsBroker
from millpond_broker_kombu.testing import MotoServer

#: short timings keep the lease tests fast: 2 s visibility, extended every 0.67 s
FAST = {"visibility_timeout": 2, "wait_time_seconds": 1, "publish_retry_timeout": 5}


class TestSqsContract(BrokerContract):
    @pytest.fixture
    def broker_url(self, moto: MotoServer) -> str:
        return moto.url

    @pytest.fixture
    def broker_options(self) -> dict[str, Any]:
        return {**MotoServer.options, **FAST}


# -- what only SQS has -------------------------------------------------------------------------------


@pytest.fixture
def broker(moto: MotoServer) -> Iterator[SqsBroker]:
    made = SqsBroker(moto.url, {**MotoServer.options, **FAST})
    yield made
    made.close()


def unique(suffix: str = "") -> str:
    return f"mp-sqs-{uuid.uuid4().hex[:10]}{suffix}"


def test_a_long_task_keeps_its_message_past_the_visibility_timeout(broker: SqsBroker) -> None:
    """The heartbeat extends the visibility while the holder never calls fetch: after three
    visibility timeouts SQS still reports the message in flight and nobody else got it."""
    queue = unique()
    broker.declare([queue])
    broker.publish(queue, sample_message("long"))
    holder = broker.consumer([queue], 1)
    held = fetch_until(holder, 1, 10)
    rival = broker.consumer([queue], 1)  # its receiver starts at once: open it after the fetch
    try:
        assert [d.message.task_id for d in held] == ["long"]
        assert fetch_until(rival, 1, 3 * broker.visibility) == []
        url = broker.url_of(queue)
        assert url is not None
        assert broker._approximate(url, "ApproximateNumberOfMessagesNotVisible") == 1
        # the heartbeat moved the consumer's own idea of the lease on too: not stale
        assert holder.stale(held[0]) is False
        held[0].tag.hidden_until = time.monotonic() - 1  # as after a SIGSTOP past the lease
        assert holder.stale(held[0]) is True
        holder.ack(held)
    finally:
        holder.close()
        rival.close()


def test_a_delay_past_the_sqs_limit_hops_and_arrives_on_time(moto: MotoServer) -> None:
    """With the limit made 1 s, a 3 s delay is held by SQS in hops (the header says when it is
    really due) and reaches the worker after its eta, without the header."""

    class ShortLimit(SqsBroker):
        max_delay = 1

    broker = ShortLimit(moto.url, {**MotoServer.options, **FAST})
    queue = unique()
    try:
        broker.declare([queue])
        eta = time.time() + 3
        broker.publish(queue, sample_message("far"), eta=eta)
        consumer = broker.consumer([queue], 1)
        try:
            got = fetch_until(consumer, 1, 15)
            arrived = time.time()
            assert [d.message.task_id for d in got] == ["far"]
            assert arrived >= eta - 0.05, f"arrived {eta - arrived:.2f} s early"
            assert LONG_ETA not in got[0].message.headers
            consumer.ack(got)
        finally:
            consumer.close()
    finally:
        broker.close()


def test_fifo_queue_keeps_group_ids_and_refuses_delays(broker: SqsBroker) -> None:
    queue = unique(".fifo")
    broker.declare([queue])
    assert broker.physical(queue).endswith(".fifo")
    for i in range(3):
        broker.publish(queue, encode_task("kit.n", (i,), task_id=f"f{i}"))
    with pytest.raises(PublishError, match="FIFO"):
        broker.publish(queue, sample_message(), eta=time.time() + 5)
    consumer = broker.consumer([queue], 3)
    try:
        got = fetch_until(consumer, 3, 10, max_count=3)
        assert [d.message.task_id for d in got] == ["f0", "f1", "f2"], "FIFO order"
        raw = got[0].tag.raw
        assert raw["Attributes"]["MessageGroupId"] == "default"
        consumer.ack(got)
    finally:
        consumer.close()


def test_dead_letter_after_sets_an_sqs_redrive_policy(moto: MotoServer) -> None:
    broker = SqsBroker(moto.url, {**MotoServer.options, **FAST, "dead_letter_after": 5})
    queue = unique()
    try:
        broker.declare([queue])
        url = broker.url_of(queue)
        assert url is not None
        attrs = broker.client().get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
        policy = json.loads(attrs["Attributes"]["RedrivePolicy"])
        assert int(policy["maxReceiveCount"]) == 5
        assert policy["deadLetterTargetArn"].endswith(broker.physical(f"{queue}.dead"))
        with pytest.raises(ConfigurationError, match="FIFO"):
            broker.declare([unique(".fifo")])
    finally:
        broker.close()


def test_the_body_is_kombus_base64_envelope(broker: SqsBroker) -> None:
    """What Celery's kombu reads: base64 of kombu's JSON envelope, with the body base64 inside."""
    queue = unique()
    broker.declare([queue])
    sent = encode_task("kit.add", (2, 3), task_id="env-1")
    broker.publish(queue, sent)
    url = broker.url_of(queue)
    assert url is not None
    raw = broker.client().receive_message(QueueUrl=url, WaitTimeSeconds=2)["Messages"][0]
    payload = json.loads(base64.b64decode(raw["Body"]))
    assert payload["headers"]["id"] == "env-1"
    assert payload["properties"]["body_encoding"] == "base64"
    assert base64.b64decode(payload["body"]) == sent.body
    assert payload["content-type"] == "application/json"


def test_settings_errors_name_the_option(moto: MotoServer) -> None:
    with pytest.raises(ConfigurationError, match="wait_time_seconds"):
        SqsBroker(moto.url, {"wait_time_seconds": 25})
    with pytest.raises(ConfigurationError, match="creation_attributes"):
        SqsBroker(moto.url, {"sqs-creation-attributes": {}})
    with pytest.raises(ConfigurationError, match="visibility_timout"):
        SqsBroker(f"{moto.url}?visibility_timout=3")


def test_refused_credentials_fail_at_once_saying_so() -> None:
    """A moto that checks credentials (it knows none): publishing fails at once with
    PublishAccessDenied, not after publish_retry_timeout of retries, and a consumer's fetch
    raises AccessDenied, which stops a worker."""
    from millpond.exceptions import AccessDenied, PublishAccessDenied

    with MotoServer(authenticate=True) as server:
        broker = SqsBroker(server.url, {**MotoServer.options, "publish_retry_timeout": 30})
        try:
            start = time.monotonic()
            with pytest.raises(AccessDenied, match="credentials"):
                broker.declare([unique()])
            with pytest.raises(PublishAccessDenied):
                broker.publish(unique(), sample_message())
            assert time.monotonic() - start < 10, "refused credentials were retried"
        finally:
            broker.close()
