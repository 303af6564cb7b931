"""Property-based tests of the decoder and the envelope, and the fuzz target run as a bounded
hypothesis test (core/tests/test_protocol.py has the first, narrower properties).

The strategies produce what a hostile producer can put on the wire: JSON of any shape and depth,
integers of any size, NaN and infinities, strings where numbers belong and the other way round,
invalid UTF-8, unknown encodings and content types.
"""

from __future__ import annotations

import json
import math
import pickle
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from millpond import Millpond
from millpond.exceptions import (
    MalformedMessage,
    MessageError,
    MessageTooLarge,
    SignatureError,
    UnsupportedContentType,
)
from millpond.wire import envelope, signing
from millpond.wire.protocol import DEATH_REASON, JSON, PICKLE, Message, decode_task, encode_task
from tests.hostile.fuzz_decoder import SEEDS, _check, _says_why, fuzz_one_input

HEADER_NAMES = [
    "id", "task", "retries", "eta", "expires", "timelimit", "root_id", "parent_id", "group",
    "origin", "ignore_result", "traceparent", "tracestate", "millpond_sent_at", "argsrepr",
    signing.HEADER,
]  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: JSON integers have no size limit
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
headers = st.dictionaries(
    st.sampled_from(HEADER_NAMES) | st.text(max_size=8), json_values, max_size=8
)


def _dump(value: Any) -> bytes:
    return json.dumps(value).encode()


bodies = (
    st.binary(max_size=256)
    | json_values.map(_dump)
    | st.tuples(json_values, json_values, json_values).map(lambda t: _dump(list(t)))
    | st.tuples(
        st.lists(json_values, max_size=3), st.dictionaries(st.text(max_size=5), json_values)
    ).map(lambda t: _dump([t[0], t[1], None]))
)
content_types = st.sampled_from(
    [JSON, "application/json; charset=utf-8", "", "text/plain"]
) | st.text(max_size=12)
encodings = st.sampled_from(["utf-8", "latin-1", "utf-16", "rot13", "bogus", ""]) | st.text(
    max_size=8
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies, headers, content_types, encodings)
@example(b"[[1],{},{}]", {"id": "x", "task": "t", "eta": 10**400}, JSON, "utf-8")
@example(b"[[1],{},{}]", {"id": "x", "task": "t", "timelimit": [10**400, None]}, JSON, "utf-8")
@example(b"[[1],{},{}]", {"id": "x", "task": "t", "millpond_sent_at": 10**400}, JSON, "utf-8")
@example(b"[[1],{},{}]", {"id": "x", "task": "t", "expires": -(10**400)}, JSON, "utf-8")
@example(b"", {signing.HEADER: "\x80"}, JSON, "utf-8")
def test_any_message_decodes_validly_or_is_refused_with_a_reason(
    body: bytes, hdrs: dict[str, Any], content_type: str, encoding: str
) -> None:
    message = Message(body=body, headers=hdrs, content_type=content_type, content_encoding=encoding)
    _ = message.task_id, message.task_name
    try:
        signing.verify(message, "k")  # a worker with signing_key checks this first
    except SignatureError as exc:
        _says_why(exc)
    try:
        msg = decode_task(message)
    except MessageError as exc:
        _says_why(exc)
        return
    _check(msg)


@given(st.binary(min_size=65, max_size=300), content_types)
def test_the_size_limit_comes_before_any_parsing(body: bytes, content_type: str) -> None:
    message = Message(body=body, headers={"id": 5}, content_type=content_type)
    with pytest.raises(MessageTooLarge, match="over the 64-byte limit"):
        decode_task(message, max_size=64)


@given(st.integers(min_value=1, max_value=300_000))
@settings(max_examples=40, deadline=None)
def test_nesting_of_any_depth_is_refused_or_decoded_never_a_crash(depth: int) -> None:
    nested = b"[" * depth + b"]" * depth
    message = encode_task("t", task_id="x")
    message.body = nested
    try:
        decode_task(message, max_size=10**7)
    except MalformedMessage:
        pass
    try:
        envelope.loads(nested)
    except MalformedMessage:
        pass


class Bomb:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@settings(deadline=None, max_examples=50)
@given(
    st.sampled_from(
        [PICKLE, "application/x-python-serialize; charset=binary", "APPLICATION/X-PYTHON-SERIALIZE"]
    )
)
def test_pickle_is_never_loaded_unless_accepted(tmp_path_factory: Any, content_type: str) -> None:
    marker = tmp_path_factory.mktemp("pickle") / "ran"
    message = encode_task("t", task_id="x")
    message.body = pickle.dumps(Bomb(marker))
    message.content_type = content_type
    with pytest.raises(UnsupportedContentType, match="pickle is refused"):
        decode_task(message)
    assert not marker.exists()


arguments = st.lists(json_values.filter(lambda v: "NaN" not in json.dumps(v)), max_size=4)
keywords = st.dictionaries(
    st.text(max_size=6), json_values.filter(lambda v: "NaN" not in json.dumps(v)), max_size=3
)


@given(arguments, keywords, st.text(min_size=1, max_size=255), st.integers(0, 10**6))
def test_what_a_producer_encodes_decodes_the_same_through_the_envelope(
    args: list[Any], kwargs: dict[str, Any], task: str, retries: int
) -> None:
    sent = encode_task(task, args, kwargs, eta=1.7e9, expires=1.8e9, headers={"retries": retries})
    signing.sign(sent, "k")
    received = envelope.loads(envelope.dumps(sent, queue="q"))
    signing.verify(received, "k")
    msg = decode_task(received)
    assert list(msg.args) == json.loads(json.dumps(args))
    assert msg.kwargs == json.loads(json.dumps(kwargs))
    assert (msg.task_name, msg.retries, msg.eta, msg.expires) == (task, retries, 1.7e9, 1.8e9)


signed_headers = st.sampled_from(
    [
        "id",
        "task",
        "eta",
        "expires",
        "retries",
        "timelimit",
        "root_id",
        "parent_id",
        "group",
        "ignore_result",
    ]
)


@given(arguments, st.data())
def test_any_change_to_a_signed_message_is_caught(args: list[Any], data: st.DataObject) -> None:
    message = encode_task("shop.charge", args, {"amount": 10}, task_id=str(uuid.uuid4()))
    signing.sign(message, "secret")
    how = data.draw(st.sampled_from(["body", "header", "content type", "key", "unsigned"]))
    if how == "body":
        body = bytearray(message.body)
        at = data.draw(st.integers(0, len(body) - 1))
        body[at] ^= data.draw(st.integers(1, 255))
        message.body = bytes(body)
    elif how == "header":
        name = data.draw(signed_headers)
        new = data.draw(json_values.filter(lambda v: v != message.headers.get(name)))
        if json.dumps(new, default=str) == json.dumps(message.headers.get(name), default=str):
            return
        message.headers[name] = new
    elif how == "content type":
        message.content_type = data.draw(st.text(max_size=10).filter(lambda t: t != JSON))
    elif how == "unsigned":
        message.headers.pop(signing.HEADER)
    key = "another" if how == "key" else "secret"
    with pytest.raises(SignatureError):
        signing.verify(message, key)


@given(
    st.binary(max_size=512)
    | json_values.map(_dump)
    | st.dictionaries(
        st.sampled_from(["body", "headers", "properties", "content-type", "content-encoding"]),
        json_values,
    ).map(_dump)
)
def test_any_redis_entry_is_an_envelope_or_refused(raw: bytes) -> None:
    try:
        message = envelope.loads(raw)
    except MalformedMessage as exc:
        _says_why(exc)
        return
    assert isinstance(message.body, bytes)
    assert isinstance(message.headers, dict)
    assert isinstance(message.content_type, str) and isinstance(message.content_encoding, str)


# -- the fuzz target, bounded ----------------------------------------------------------------------


def _mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """The seed with a few bytes flipped, cut or inserted: near-valid inputs reach deeper."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(seed)
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["flip", "cut", "insert"]))
            at = draw(st.integers(1, max(1, len(data) - 1)))
            if op == "flip" and at < len(data):
                data[at] = draw(st.integers(0, 255))
            elif op == "cut":
                del data[at : at + draw(st.integers(1, 16))]
            else:
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
        return bytes(data)

    return mutate()


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048) | st.one_of(*(_mutations(s) for s in SEEDS)))
def test_fuzz_target_bounded(data: bytes) -> None:
    fuzz_one_input(data)


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_seeds_decode(seed: bytes) -> None:
    fuzz_one_input(seed)


# -- the worker's last line of defence -------------------------------------------------------------


def test_a_decoder_bug_dead_letters_the_message_instead_of_killing_the_worker(
    start_worker: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If decoding raised something other than a MessageError (the 400-digit eta did, before it
    was fixed), the worker would die, the message would come back, and take every worker down
    after it. Simulate such a bug for one message: it is dead-lettered, the rest runs."""
    from millpond.consume import receive as receive_module

    name = f"mem-{uuid.uuid4().hex[:8]}"
    app = Millpond("guard", broker_url=f"memory://{name}", default_queue=name, queues=[name])
    ran: list[int] = []
    lock = threading.Lock()

    @app.task
    def add(x: int, y: int) -> int:
        with lock:
            ran.append(x + y)
        return x + y

    real = decode_task

    def buggy(message: Message, **kwargs: Any) -> Any:
        if message.task_id == "poison":
            raise OverflowError("int too large to convert to float")
        return real(message, **kwargs)

    monkeypatch.setattr(receive_module, "decode_task", buggy)
    try:
        running = start_worker(app, pool="solo")
        app.broker.publish(name, encode_task(add.name, [1, 1], task_id="poison"))
        results = [add.delay(i, i) for i in range(5)]
        assert [r.get(timeout=10) for r in results] == [0, 2, 4, 6, 8]
        (dead,) = app.broker.dead_letters(name)
        assert dead.task_id == "poison"
        assert "OverflowError" in dead.headers[DEATH_REASON]
        assert "bug in millpond" in dead.headers[DEATH_REASON]
        assert running.worker.ready.is_set() and running.thread.is_alive()
        assert running.stop() == 0
    finally:
        app.close()
    assert math.fsum(ran) == 20


def test_a_message_the_broker_will_not_hold_until_its_eta_is_dead_lettered(
    start_worker: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A not-yet-due message (a Celery producer puts the eta in a header) is handed back to the
    broker to hold. If the broker refuses, the worker dead-letters it with the reason instead of
    dying with the exception."""
    import time

    from millpond.exceptions import PublishError

    name = f"mem-{uuid.uuid4().hex[:8]}"
    app = Millpond("eta", broker_url=f"memory://{name}", default_queue=name, queues=[name])

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    broker = app.broker
    kind = type(broker)  # the worker makes its own broker object: patch the class
    publish = kind.publish

    def refusing(self: Any, queue: str, message: Message, *, eta: float | None = None) -> None:
        if eta is not None:
            raise PublishError("the broker refused the delayed message (test)")
        publish(self, queue, message)

    monkeypatch.setattr(kind, "publish", refusing)
    try:
        running = start_worker(app, pool="solo")
        later = encode_task(add.name, [1, 1], task_id="later", eta=time.time() + 3600)
        app.broker.publish(name, later)
        assert add.delay(2, 2).get(timeout=10) == 4
        (dead,) = wait_until_dead(app, name)
        assert dead.task_id == "later"
        assert "could not hand the message back to the broker" in dead.headers[DEATH_REASON]
        assert "PublishError" in dead.headers[DEATH_REASON]
        assert running.thread.is_alive()
        assert running.stop() == 0
    finally:
        app.close()


def wait_until_dead(app: Millpond, queue: str) -> list[Message]:
    from millpond.testing.harness import wait_until

    return list(wait_until(lambda: app.broker.dead_letters(queue), 10, "a dead letter"))
