"""Canvas across libraries: every kind, sent by Celery 5.7 and run by millpond, and the other way
round, on Redis and on RabbitMQ (with Redis results); results read by the other library too."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.interop import sink
from tests.interop.conftest import WAIT, Direction, Pair, drain, wait_until
from tests.interop.errors import InteropError

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.slow]


def chord_keys(group_id: str) -> dict[str, Any]:
    """What is left of a chord's join in Redis (Celery's keys)."""
    client = sink.client()
    prefix = f"celery-taskset-meta-{group_id}"
    return {
        suffix: client.get(prefix + suffix)
        if suffix in (".c", ".s")
        else client.exists(prefix + suffix)
        for suffix in (".s", ".j", ".d", ".c")
    }


def joined(group_id: str) -> bool:
    """The join has ended: its size is gone (whichever side ended it), so no part can complete
    it again."""
    return chord_keys(group_id)[".s"] is None


# -- chains ----------------------------------------------------------------------------------------
def test_chain(direction: Direction) -> None:
    add = direction.producer.task("add")
    result = (add.s(1, 2) | add.s(10) | add.s(100)).apply_async()
    assert result.get(timeout=WAIT) == 113
    assert result.parent.get(timeout=WAIT) == 13
    first = result.parent.parent
    assert first.get(timeout=WAIT) == 3
    # the other library reads the same results, and each step's children name the next step
    reader = direction.reader
    assert reader.result(result.parent.id).get(timeout=WAIT) == 13
    for side in (direction.producer, reader):
        assert [child.id for child in side.result(first.id).children] == [result.parent.id]


def test_chain_of_immutable_signatures(direction: Direction) -> None:
    add = direction.producer.task("add")
    result = (add.s(1, 2) | add.si(5, 5) | add.s(1)).apply_async()
    assert result.get(timeout=WAIT) == 11
    assert result.parent.get(timeout=WAIT) == 10
    assert result.parent.parent.get(timeout=WAIT) == 3


def test_chain_that_fails_fails_its_later_steps(direction: Direction) -> None:
    p = direction.producer
    add, boom = p.task("add"), p.task("boom")
    result = (add.s(1, 1) | boom.s() | add.s(5)).apply_async()
    with pytest.raises(ValueError, match="boom 2"):
        result.get(timeout=WAIT)
    with pytest.raises(ValueError, match="boom 2"):
        direction.reader.result(result.id).get(timeout=WAIT)
    assert result.parent.parent.get(timeout=WAIT) == 2


# -- groups ----------------------------------------------------------------------------------------
def test_group_saved_and_restored_by_the_other_side(direction: Direction) -> None:
    p = direction.producer
    add = p.task("add")
    result = p.group(add.s(i, i) for i in range(4)).apply_async()
    assert result.get(timeout=WAIT) == [0, 2, 4, 6]
    result.save()
    restored = direction.reader.restore(result.id)
    assert restored is not None
    assert restored.id == result.id
    assert [r.id for r in restored.results] == [r.id for r in result.results]
    assert restored.get(timeout=WAIT) == [0, 2, 4, 6]
    # and back: what the reader saves, the producer restores
    restored.save()
    again = p.restore(result.id)
    assert [r.id for r in again.results] == [r.id for r in result.results]


# -- chords ----------------------------------------------------------------------------------------
def test_chord(direction: Direction) -> None:
    p = direction.producer
    add, tsum = p.task("add"), p.task("tsum")
    result = p.chord(add.s(i, i) for i in range(4))(tsum.s())
    assert result.get(timeout=WAIT) == 12
    assert direction.reader.result(result.id).get(timeout=WAIT) == 12
    header = result.parent
    assert header.get(timeout=WAIT) == [0, 2, 4, 6]
    wait_until(lambda: joined(header.id), WAIT, lambda: f"the join to end: {chord_keys(header.id)}")
    left = chord_keys(header.id)
    assert (left[".c"], left[".j"], left[".d"]) == (b"done", 0, 0)


def test_chord_body_is_sent_once(direction: Direction, key: str) -> None:
    p = direction.producer
    add = p.task("add")
    result = p.chord([add.s(i, 1) for i in range(5)], p.task("record").s(key)).apply_async()
    assert result.get(timeout=WAIT) == [1, 2, 3, 4, 5]
    (entry,) = drain(key, 1, direction.pair)
    assert entry == {"side": direction.reader.kind, "value": [1, 2, 3, 4, 5]}
    wait_until(lambda: joined(result.parent.id), WAIT, "the join to end")
    assert sink.client().llen(key) == 0


def test_chord_with_a_failing_header_task(direction: Direction, key: str) -> None:
    p = direction.producer
    add, boom, tsum = p.task("add"), p.task("boom"), p.task("tsum")
    body = tsum.s()
    body.link_error(p.task("on_error").s(key))
    result = p.chord([add.s(1, 1), boom.s(2), add.s(3, 3)], body).apply_async()
    # (Celery's handle re-raises the first failure among its parents, the header's)
    with pytest.raises((p.ChordError, ValueError)):
        result.get(timeout=WAIT)
    failed_id = result.parent.results[1].id
    for side in (p, direction.reader):
        with pytest.raises(side.ChordError) as raised:
            side.result(result.id).get(timeout=WAIT)
        assert f"Dependency {failed_id} raised ValueError('boom 2')" in str(raised.value)
        assert side.result(result.id).state == "FAILURE"
    (errback,) = drain(key, 1, direction.pair)
    assert errback["kind"] == "request"
    assert errback["task_id"] == result.id
    assert errback["exc_type"] == "ChordError"
    assert errback["side"] == direction.reader.kind
    # the join has ended, so no other part can fail the chord (or call the errback) again
    wait_until(lambda: joined(result.parent.id), WAIT, "the failed chord's join to end")
    assert sink.client().llen(key) == 0


def test_chord_in_a_chain(direction: Direction) -> None:
    p = direction.producer
    add, tsum = p.task("add"), p.task("tsum")
    result = (add.s(1, 1) | p.chord([add.si(i, i) for i in range(3)], tsum.s()) | add.s(1000))()
    assert result.get(timeout=WAIT) == 1006
    assert result.parent.get(timeout=WAIT) == 6


def test_group_then_a_task_is_a_chord(direction: Direction) -> None:
    p = direction.producer
    add, tsum = p.task("add"), p.task("tsum")
    result = (p.group(add.s(1, 1), add.s(2, 2)) | tsum.s() | add.s(10)).apply_async()
    assert result.get(timeout=WAIT) == 16


def test_chain_inside_a_chord_header(direction: Direction) -> None:
    p = direction.producer
    add, tsum = p.task("add"), p.task("tsum")
    header = [add.s(1, 1) | add.s(10), add.s(2, 2)]
    assert p.chord(header, tsum.s()).apply_async().get(timeout=WAIT) == 16


def test_chord_whose_header_chain_fails(direction: Direction) -> None:
    """A chain in the header fails before its last task: that task's part is returned failed
    (Celery's worker does it when it fails the rest of the chain), so the chord fails."""
    p = direction.producer
    add, boom, tsum = p.task("add"), p.task("boom"), p.task("tsum")
    result = p.chord([add.s(1, 1) | boom.s() | add.s(1), add.s(2, 2)], tsum.s()).apply_async()
    for side in (p, direction.reader):
        with pytest.raises(side.ChordError, match="boom 2"):
            side.result(result.id).get(timeout=WAIT)


def test_failed_chord_fails_each_task_of_a_group_body(direction: Direction, key: str) -> None:
    p = direction.producer
    add, boom, tsum = p.task("add"), p.task("boom"), p.task("tsum")
    first, second = tsum.s(), tsum.s()
    second.link_error(p.task("on_error_id").s(key))
    result = p.chord([boom.s(1), add.s(1, 1)], p.group(first, second)).apply_async()
    members = result.results
    for side in (p, direction.reader):
        for member in members:
            with pytest.raises(ValueError, match="boom 1"):
                side.result(member.id).get(timeout=WAIT)
    (errback,) = drain(key, 1, direction.pair)
    assert errback["task_id"] == members[1].id


def test_failed_chord_in_a_chain_fails_the_rest(direction: Direction) -> None:
    p = direction.producer
    add, boom, tsum = p.task("add"), p.task("boom"), p.task("tsum")
    chord = p.chord([boom.si(1), add.si(2, 2)], tsum.s())
    result = (add.s(1, 1) | chord | add.s(1000)).apply_async()
    for side in (p, direction.reader):
        with pytest.raises((side.ChordError, ValueError), match="boom 1"):
            side.result(result.id).get(timeout=WAIT)


NESTED: dict[str, tuple[Callable[[Any, Any, Any], Any], Any]] = {
    # (side, add, tsum) -> canvas, and its result
    "chain ending in a group": (
        lambda p, add, _: add.s(1, 1) | p.group(add.s(1), add.s(2)),
        [3, 4],
    ),
    "chain in a group": (lambda p, add, _: p.group(add.s(1, 1) | add.s(1), add.s(2, 2)), [3, 4]),
    "group in a group": (
        lambda p, add, _: p.group(p.group(add.s(1, 1), add.s(2, 2)), add.s(3, 3)),
        [2, 4, 6],
    ),
    "chord with a chain body": (
        lambda p, add, tsum: p.chord([add.s(1, 1), add.s(2, 2)], tsum.s() | add.s(1)),
        7,
    ),
    "chord in a chord header": (
        lambda p, add, tsum: p.chord(
            [p.chord([add.s(1, 1), add.s(2, 2)], tsum.s()), add.s(3, 3)], tsum.s()
        ),
        12,
    ),
    "chord with a group body, in a chord header": (
        lambda p, add, tsum: p.chord(
            [p.chord([add.s(1, 1), add.s(2, 2)], p.group(tsum.s(), tsum.s())), add.s(3, 3)],
            tsum.s(),
        ),
        18,
    ),
    "chain ending in a chord, in a chord header": (
        lambda p, add, tsum: p.chord(
            [add.s(1, 1) | p.group(add.s(10), add.s(20)) | tsum.s(), add.s(100, 100)], tsum.s()
        ),
        234,
    ),
    "chord after a chord": (
        lambda p, add, tsum: (
            p.chord([add.s(1, 1), add.s(2, 2)], tsum.s()) | p.chord([add.s(1), add.s(2)], tsum.s())
        ),
        15,
    ),
    "group in the middle of a chain": (
        lambda p, add, tsum: add.s(1, 1) | p.group(add.s(1), add.s(2)) | tsum.s() | add.s(100),
        107,
    ),
}


@pytest.mark.parametrize("shape", sorted(NESTED))
def test_nested_canvas(direction: Direction, shape: str) -> None:
    p = direction.producer
    build, expected = NESTED[shape]
    result = build(p, p.task("add"), p.task("tsum")).apply_async()
    assert result.get(timeout=WAIT) == expected


# -- callbacks and errbacks ------------------------------------------------------------------------
def test_link(direction: Direction, key: str) -> None:
    p = direction.producer
    result = p.task("add").apply_async((2, 2), link=p.task("record").s(key))
    assert result.get(timeout=WAIT) == 4
    (entry,) = drain(key, 1, direction.pair)
    assert entry == {"side": direction.reader.kind, "value": 4}
    for side in (p, direction.reader):
        (child,) = side.result(result.id).children
        assert child.get(timeout=WAIT) == 4


def test_link_to_a_group(direction: Direction, key: str) -> None:
    p = direction.producer
    record = p.task("record")
    result = p.task("add").apply_async((5, 5), link=p.group(record.s(key), record.s(key)))
    assert result.get(timeout=WAIT) == 10
    assert [e["value"] for e in drain(key, 2, direction.pair)] == [10, 10]
    for side in (p, direction.reader):
        (child,) = side.result(result.id).children
        assert child.get(timeout=WAIT) == [10, 10]  # a GroupResult, in Celery's layout


@pytest.mark.parametrize("plain", [1, 2])
def test_link_to_callbacks_and_a_group(direction: Direction, key: str, plain: int) -> None:
    p = direction.producer
    record = p.task("record")
    links = [*(record.s(key) for _ in range(plain)), p.group(record.s(key), record.s(key))]
    result = p.task("add").apply_async((3, 4), link=links)
    assert result.get(timeout=WAIT) == 7
    entries = drain(key, plain + 2, direction.pair)
    assert [e["value"] for e in entries] == [7] * (plain + 2)
    # Celery's layout: the group callback, then the plain ones together as one group
    for side in (p, direction.reader):
        children = side.result(result.id).children
        assert [len(child.results) for child in children] == [2, plain]
        assert children[1].get(timeout=WAIT) == [7] * plain


def test_link_error_with_request_and_with_task_id(direction: Direction, key: str) -> None:
    p = direction.producer
    errbacks = [p.task("on_error").s(key), p.task("on_error_id").s(key)]
    result = p.task("boom").apply_async((7,), link_error=errbacks)
    with pytest.raises(ValueError, match="boom 7"):
        result.get(timeout=WAIT)
    entries = sorted(drain(key, 2, direction.pair), key=lambda e: e["kind"])
    assert [e["kind"] for e in entries] == ["request", "task_id"]
    assert {e["task_id"] for e in entries} == {result.id}
    assert (entries[0]["exc_type"], entries[0]["message"]) == ("ValueError", "boom 7")


# -- map, starmap, chunks --------------------------------------------------------------------------
def test_starmap(direction: Direction) -> None:
    add = direction.producer.task("add")
    assert add.starmap([(1, 2), (3, 4)]).apply_async().get(timeout=WAIT) == [3, 7]


def test_map(direction: Direction) -> None:
    tsum = direction.producer.task("tsum")
    assert tsum.map([[1, 2], [3, 4]]).apply_async().get(timeout=WAIT) == [3, 7]


def test_chunks(direction: Direction) -> None:
    add = direction.producer.task("add")
    result = add.chunks([(i, i) for i in range(10)], 3).apply_async()
    assert result.get(timeout=WAIT) == [[0, 2, 4], [6, 8, 10], [12, 14, 16], [18]]


def test_chunks_task_sent_by_name(direction: Direction) -> None:
    """`celery.chunks` as a message (as a chain step or callback sends it): the worker sends
    the chunks as a group and returns the group's result."""
    p = direction.producer
    kwargs = {"task": dict(p.task("add").s()), "it": [[1, 1], [2, 2], [3, 3]], "n": 2}
    stored = p.app.send_task("celery.chunks", kwargs=kwargs).get(timeout=WAIT)
    group_result = p.from_tuple(stored)
    assert group_result.get(timeout=WAIT) == [[2, 4], [6]]


def test_chord_unlock_as_celery_sends_it(pair: Pair) -> None:
    """Celery joins a chord with `celery.chord_unlock` on result backends that cannot join one
    (never on Redis): the message its fallback sends, to a millpond worker, runs the body once
    the header is ready."""
    celery = pair.celery
    header = celery.group(celery.task("add").s(i, i) for i in range(3)).apply_async()
    body = celery.task("tsum").s()
    body_result = body.freeze()
    celery.app.tasks["celery.chord_unlock"].apply_async(
        (header.id, body),
        {"interval": 0.1, "max_retries": None, "result": [r.as_tuple() for r in header.results]},
        queue=pair.millpond.queue,
    )
    assert body_result.get(timeout=WAIT) == 6


# -- results read by the other side ----------------------------------------------------------------
def test_failures_come_back_as_their_own_type(direction: Direction) -> None:
    p = direction.producer
    result = p.task("fail_custom").apply_async(("custom failure",))
    for side in (p, direction.reader):
        with pytest.raises(InteropError, match="custom failure"):
            side.result(result.id).get(timeout=WAIT)
        assert side.result(result.id).state == "FAILURE"


def test_expired_task_is_revoked_for_both(direction: Direction) -> None:
    p = direction.producer
    past = datetime.now(UTC) - timedelta(minutes=1)
    result = p.task("add").apply_async((1, 1), expires=past)
    with pytest.raises(p.TaskRevokedError):
        result.get(timeout=WAIT)
    assert result.state == "REVOKED"
    reader = direction.reader.result(result.id)
    assert reader.state == "REVOKED"
    with pytest.raises(direction.reader.TaskRevokedError):
        reader.get(timeout=WAIT)


# -- a chord whose header runs on both kinds of worker ---------------------------------------------
@pytest.mark.parametrize("completer", ["celery", "millpond"])
def test_chord_header_split_between_celery_and_millpond(
    direction: Direction, completer: str, key: str
) -> None:
    """One header task on each worker, and a third, held until the other two have returned their
    parts, on the worker named `completer`: that worker completes the join and sends the body."""
    pair: Pair = direction.pair
    p = direction.producer
    add, tsum, gate = p.task("add"), p.task("tsum"), p.task("gate")
    queue_of = {"celery": pair.celery.queue, "millpond": pair.millpond.queue}
    header = [
        add.s(1, 1).set(queue=pair.celery.queue),
        add.s(2, 2).set(queue=pair.millpond.queue),
        gate.s(key, 100).set(queue=queue_of[completer]),
    ]
    result = p.chord(header, tsum.s()).apply_async()
    group_id = result.parent.id
    parts = f"celery-taskset-meta-{group_id}.j"
    wait_until(lambda: sink.client().zcard(parts) == 2, WAIT, "the two ungated parts")
    sink.client().rpush(key, "open")
    assert result.get(timeout=WAIT) == 106
    wait_until(lambda: joined(group_id), WAIT, "the join to end")
    sent_by_millpond = any(
        group_id in line and "chord complete" in line
        for line in pair.workers["millpond"].text().splitlines()
    )
    assert sent_by_millpond == (completer == "millpond")
