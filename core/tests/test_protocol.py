"""Celery protocol v2: what we encode decodes, what Celery sends decodes, and bad input is typed."""

from __future__ import annotations

import json
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from millpond.exceptions import (
    MalformedMessage,
    MessageError,
    MessageTooLarge,
    UnsupportedContentType,
)
from millpond.wire import envelope
from millpond.wire.protocol import PICKLE, Message, decode_task, encode_task


def test_round_trip_keeps_every_header() -> None:
    msg = encode_task(
        "shop.add",
        (2, 3),
        {"z": 1},
        eta=1_700_000_000.5,
        expires=1_700_000_100.0,
        time_limit=30,
        soft_time_limit=20,
        headers={
            "retries": 2,
            "root_id": "r",
            "parent_id": "p",
            "origin": "me@host",
            "traceparent": "00-ab",
        },
    )
    decoded = decode_task(msg)
    assert decoded.task_name == "shop.add"
    assert decoded.args == (2, 3)
    assert decoded.kwargs == {"z": 1}
    assert decoded.retries == 2
    assert decoded.eta == pytest.approx(1_700_000_000.5)
    assert decoded.expires == pytest.approx(1_700_000_100.0)
    assert (decoded.time_limit, decoded.soft_time_limit) == (30.0, 20.0)
    assert (decoded.root_id, decoded.parent_id, decoded.origin) == ("r", "p", "me@host")
    assert decoded.headers["traceparent"] == "00-ab"
    assert msg.headers["lang"] == "py"
    assert msg.headers["timelimit"] == [30, 20]
    assert msg.properties["correlation_id"] == decoded.task_id
    assert json.loads(msg.body)[2] == {
        "callbacks": None,
        "errbacks": None,
        "chain": None,
        "chord": None,
    }


def test_message_sent_by_celery_decodes() -> None:
    """A message built by Celery 5's own protocol v2 code decodes unchanged."""
    celery = pytest.importorskip("celery")
    app = celery.Celery("interop", broker="memory://")
    amqp = app.amqp
    task_msg = amqp.as_task_v2(
        "tid-1",
        "shop.add",
        args=(2, 3),
        kwargs={"k": "v"},
        retries=1,
        time_limit=10,
        soft_time_limit=5,
    )
    body = json.dumps(task_msg.body).encode()
    message = Message(
        body=body,
        headers=dict(task_msg.headers),
        content_type="application/json",
        properties=dict(task_msg.properties),
    )
    decoded = decode_task(message)
    assert (decoded.task_id, decoded.task_name, decoded.args, decoded.kwargs) == (
        "tid-1",
        "shop.add",
        (2, 3),
        {"k": "v"},
    )
    assert decoded.retries == 1
    assert (decoded.time_limit, decoded.soft_time_limit) == (10.0, 5.0)


def test_envelope_round_trip() -> None:
    msg = encode_task("t", [1], {})
    back = envelope.loads(envelope.dumps(msg, queue="q"))
    assert back.body == msg.body
    assert back.headers == msg.headers
    assert back.content_type == "application/json"
    assert decode_task(back).args == (1,)


@pytest.mark.parametrize(
    ("mutate", "error", "needle"),
    [
        (lambda m: setattr(m, "body", b"{not json"), MalformedMessage, "not valid JSON"),
        (lambda m: setattr(m, "body", b'{"a": 1}'), MalformedMessage, "[args, kwargs, embed]"),
        (lambda m: setattr(m, "body", b'["x", {}, {}]'), MalformedMessage, "args must be an array"),
        (
            lambda m: setattr(m, "body", b"[[], [], {}]"),
            MalformedMessage,
            "kwargs must be an object",
        ),
        (lambda m: setattr(m, "body", b"\xff\xfe"), MalformedMessage, "utf-8"),
        (lambda m: setattr(m, "body", b"[" * 100_000), MalformedMessage, "JSON"),
        (lambda m: m.headers.pop("task"), MalformedMessage, "'task'"),
        (lambda m: m.headers.update(id=""), MalformedMessage, "'id'"),
        (lambda m: m.headers.update(retries=-1), MalformedMessage, "retries"),
        (lambda m: m.headers.update(retries="1"), MalformedMessage, "retries"),
        (lambda m: m.headers.update(eta="yesterday"), MalformedMessage, "eta"),
        (lambda m: m.headers.update(timelimit=[1]), MalformedMessage, "timelimit"),
        (lambda m: m.headers.update(timelimit=[-1, None]), MalformedMessage, "positive"),
        (lambda m: setattr(m, "content_type", PICKLE), UnsupportedContentType, "pickle is refused"),
        (
            lambda m: setattr(m, "content_type", "application/x-yaml"),
            UnsupportedContentType,
            "decodes JSON (and pickle, when allowed) only: send JSON",
        ),
        (
            lambda m: setattr(m, "content_type", "application/x-msgpack"),
            UnsupportedContentType,
            "task_serializer = 'json'",
        ),
        (lambda m: setattr(m, "headers", []), MalformedMessage, "headers"),
    ],
)
def test_bad_messages_raise_typed_errors(mutate, error, needle) -> None:  # type: ignore[no-untyped-def]
    msg = encode_task("t", [1], {"a": 2})
    mutate(msg)
    with pytest.raises(error) as info:
        decode_task(msg)
    assert needle in str(info.value)


def test_size_limit() -> None:
    msg = encode_task("t", ["x" * 2000], {})
    with pytest.raises(MessageTooLarge, match="max_message_size"):
        decode_task(msg, max_size=1000)


def test_pickle_only_when_explicitly_accepted() -> None:
    msg = Message(
        body=pickle.dumps([[1], {}, {}]), headers=encode_task("t").headers, content_type=PICKLE
    )
    with pytest.raises(UnsupportedContentType):
        decode_task(msg)
    assert decode_task(msg, accept=frozenset({PICKLE})).args == (1,)


def test_unserialisable_arguments_fail_at_send() -> None:
    with pytest.raises(TypeError, match="cannot be sent as JSON"):
        encode_task("t", [object()])


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # a loaded CI machine
@given(
    st.binary(max_size=512),
    st.dictionaries(
        st.text(max_size=8), st.none() | st.integers() | st.text(max_size=8), max_size=6
    ),
)
def test_decoder_never_crashes_on_arbitrary_input(body: bytes, headers: dict) -> None:  # type: ignore[type-arg]
    """Whatever arrives, the decoder either returns a Job or raises a MessageError."""
    try:
        decode_task(Message(body=body, headers=headers))
    except MessageError:
        pass


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # a loaded CI machine
@given(st.binary(max_size=512))
def test_envelope_never_crashes_on_arbitrary_input(raw: bytes) -> None:
    try:
        envelope.loads(raw)
    except MessageError:
        pass
