"""The Redis result backend's chord join and saved groups, against Celery 5.7's own Redis backend
on the same server: the same keys and records, a part counted once whoever returns it, one claim,
a claim that lapses and passes on (to millpond or to Celery), and the done marker both respect.

Celery's side is its real `RedisBackend.on_chord_part_return` with a real Redis broker: when it
completes a join it publishes the body, which the test finds in the queue's list.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from millpond_broker_redis import RedisResultBackend

pytestmark = pytest.mark.redis

REDIS_URL = "redis://127.0.0.1:6379/0"
SUFFIXES = (".s", ".t", ".j", ".d", ".c")


def gid() -> str:
    return f"chord-test-{uuid.uuid4().hex}"


def value(i: int) -> dict[str, Any]:
    return {"n": i, "text": "ü"}


@pytest.fixture
def shared() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    for key in client.scan_iter(match="*chord-test-*"):
        client.delete(key)
    client.close()


@pytest.fixture
def backend() -> Iterator[RedisResultBackend]:
    b = RedisResultBackend(REDIS_URL, {"result_expires": 600})
    yield b
    b.close()


class CeleryJoin:
    """Celery's Redis backend on the same server, and the queue its bodies are published to."""

    def __init__(self) -> None:
        from celery import Celery

        self.queue = f"chord-test-q-{uuid.uuid4().hex[:10]}"
        self.app = Celery("chords", broker=REDIS_URL, backend=REDIS_URL)
        self.app.conf.update(task_default_queue=self.queue, result_expires=600)
        self.client = redis.Redis.from_url(REDIS_URL)

    def body(self, name: str = "proj.tsum") -> dict[str, Any]:
        sig = self.app.signature(name)
        sig.freeze()
        return dict(json.loads(json.dumps(sig)))

    def part(self, group_id: str, task_id: str, index: int | None, result: Any, body: Any,
             state: str = "SUCCESS") -> None:  # fmt: skip
        from celery.app.task import Context

        request = Context(id=task_id, group=group_id, group_index=index, chord=body)
        self.app.backend.on_chord_part_return(request, state, result)

    def sent(self) -> list[tuple[str, Any]]:
        """The bodies Celery published: (task name, its args)."""
        out = []
        for raw in self.client.lrange(self.queue, 0, -1):
            envelope = json.loads(raw)
            args, _, _ = json.loads(base64.b64decode(envelope["body"]))
            out.append((envelope["headers"]["task"], args))
        return out

    def close(self) -> None:
        release_celery_results(self.app)
        self.client.delete(self.queue)
        self.client.close()
        self.app.close()


def release_celery_results(app: Any) -> None:
    """Drop the result handles a Celery app still waits on (a GroupResult subscribes to its
    members), so none is collected after the interpreter has begun to shut down."""
    pending = app.backend._pending_results
    pending.concrete.clear()
    pending.weak.clear()


@pytest.fixture
def celery_join() -> Iterator[CeleryJoin]:
    join = CeleryJoin()
    yield join
    join.close()


def layout(client: redis.Redis, group_id: str) -> dict[str, Any]:
    prefix = f"celery-taskset-meta-{group_id}"
    return {s: client.type(prefix + s).decode() for s in SUFFIXES if client.exists(prefix + s)}


# -- the join, millpond alone ------------------------------------------------------------------------
def test_parts_come_back_once_in_header_order(
    backend: RedisResultBackend, shared: redis.Redis
) -> None:
    group_id = gid()
    backend.set_chord_size(group_id, 3)
    assert backend.chord_part_return(group_id, "t2", 2, "SUCCESS", value(2)) is None
    assert backend.chord_part_return(group_id, "t0", 0, "SUCCESS", value(0)) is None
    # the same part again (a redelivered header task), even with another result, counts once
    assert backend.chord_part_return(group_id, "t0", 0, "SUCCESS", value(99)) is None
    error = {"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"}
    parts = backend.chord_part_return(group_id, "t1", 1, "FAILURE", error)
    assert parts == [
        ("t0", "SUCCESS", value(0)),
        ("t1", "FAILURE", error),
        ("t2", "SUCCESS", value(2)),
    ]
    prefix = f"celery-taskset-meta-{group_id}"
    assert shared.zrange(prefix + ".j", 0, -1, withscores=True) == [
        (json.dumps([1, "t0", "SUCCESS", value(0)]).encode(), 0.0),
        (json.dumps([1, "t1", "FAILURE", error]).encode(), 1.0),
        (json.dumps([1, "t2", "SUCCESS", value(2)]).encode(), 2.0),
    ]
    assert shared.smembers(prefix + ".d") == {b"t0:0", b"t1:1", b"t2:2"}
    assert 0 < shared.pttl(prefix + ".c") <= backend.claim_ttl * 1000
    backend.chord_done(group_id)
    assert layout(shared, group_id) == {".c": "string"}
    assert shared.get(prefix + ".c") == b"done"
    assert 0 < shared.ttl(prefix + ".c") <= 300
    # a late copy of a part after the body went out is ignored
    assert backend.chord_part_return(group_id, "t2", 2, "SUCCESS", value(2)) is None
    assert layout(shared, group_id) == {".c": "string"}


def test_a_part_without_an_index_sorts_last(backend: RedisResultBackend) -> None:
    group_id = gid()
    backend.set_chord_size(group_id, 2)
    assert backend.chord_part_return(group_id, "late", None, "SUCCESS", 1) is None
    parts = backend.chord_part_return(group_id, "first", 0, "SUCCESS", 0)
    assert parts == [("first", "SUCCESS", 0), ("late", "SUCCESS", 1)]
    backend.chord_done(group_id)


def test_one_caller_of_many_gets_the_join(backend: RedisResultBackend) -> None:
    """The last part returned by eight callers at once (copies of one redelivered task, and
    separate backends as separate workers would have): exactly one gets the parts."""
    group_id = gid()
    backend.set_chord_size(group_id, 4)
    for i in range(3):
        assert backend.chord_part_return(group_id, f"t{i}", i, "SUCCESS", i) is None
    workers = [RedisResultBackend(REDIS_URL) for _ in range(8)]
    start = threading.Barrier(len(workers))
    got: list[Any] = []

    def last_part(b: RedisResultBackend) -> None:
        start.wait(10)
        got.append(b.chord_part_return(group_id, "t3", 3, "SUCCESS", 3))

    threads = [threading.Thread(target=last_part, args=(b,)) for b in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    winners = [parts for parts in got if parts is not None]
    assert len(got) == 8
    assert winners == [[("t0", "SUCCESS", 0), ("t1", "SUCCESS", 1), ("t2", "SUCCESS", 2),
                        ("t3", "SUCCESS", 3)]]  # fmt: skip
    for b in workers:
        b.chord_done(group_id)  # only the holder's call ends the join
        b.close()


def test_a_claim_whose_holder_died_passes_on(
    backend: RedisResultBackend, shared: redis.Redis
) -> None:
    group_id = gid()
    dead = RedisResultBackend(REDIS_URL)
    dead.claim_ttl = 0.3
    try:
        dead.set_chord_size(group_id, 2)
        assert dead.chord_part_return(group_id, "a", 0, "SUCCESS", 1) is None
        assert dead.chord_part_return(group_id, "b", 1, "SUCCESS", 2) is not None
        # its worker dies here, before the body is sent: while the claim lasts, no one else
        assert backend.chord_part_return(group_id, "b", 1, "SUCCESS", 2) is None
        claim = f"celery-taskset-meta-{group_id}.c"
        wait_gone(shared, claim, within=10)
        # the redelivered header task finds the claim lapsed and completes the join
        parts = backend.chord_part_return(group_id, "b", 1, "SUCCESS", 2)
        assert parts == [("a", "SUCCESS", 1), ("b", "SUCCESS", 2)]
        backend.chord_done(group_id)
        assert shared.get(claim) == b"done"
    finally:
        dead.close()


def test_the_holder_retrying_after_a_lost_reply_gets_the_parts_again(
    backend: RedisResultBackend,
) -> None:
    """One call is one claim token, kept across its retries: if the reply to the completing
    call was lost and the call is sent again, it finds its own claim and gets the parts."""
    group_id = gid()
    backend.set_chord_size(group_id, 1)
    names = [".j", ".t", ".s", ".d", "", ".c"]
    keys = [f"celery-taskset-meta-{group_id}{n}" for n in names]
    args = ["t0", json.dumps([1, "t0", "SUCCESS", 7]), "0", 600, 600, 30_000, "token-1"]
    client = backend.pools.client()
    first = backend._chord_return(keys=keys, args=args, client=client)
    again = backend._chord_return(keys=keys, args=args, client=client)
    other = backend._chord_return(keys=keys, args=[*args[:-1], "token-2"], client=client)
    assert first == again == [1, [json.dumps([1, "t0", "SUCCESS", 7]).encode()]]
    assert other == [1]


def test_claim_expiry_is_known_only_for_a_complete_claimed_join(
    backend: RedisResultBackend, shared: redis.Redis
) -> None:
    group_id = gid()
    backend.set_chord_size(group_id, 2)
    backend.chord_part_return(group_id, "t0", 0, "SUCCESS", 0)
    assert backend.chord_claim_expires(group_id) is None  # not complete
    before = time.time()
    assert backend.chord_part_return(group_id, "t1", 1, "SUCCESS", 1) is not None
    expires = backend.chord_claim_expires(group_id)
    assert expires is not None
    assert before < expires <= time.time() + backend.claim_ttl
    backend.chord_done(group_id)
    assert backend.chord_claim_expires(group_id) is None  # done
    # a claim Celery's worker holds counts the same
    other = gid()
    backend.set_chord_size(other, 1)
    backend.chord_part_return(other, "t0", 0, "SUCCESS", 0)
    shared.set(f"celery-taskset-meta-{other}.c", uuid.uuid4().hex, px=10_000)
    expires = backend.chord_claim_expires(other)
    assert expires is not None
    assert time.time() < expires <= time.time() + 10
    assert backend.chord_claim_expires(gid()) is None  # no such chord


def test_a_released_claim_passes_on_at_once(
    backend: RedisResultBackend, shared: redis.Redis
) -> None:
    """The holder could not send the body (the broker stayed away) and gives the claim up: the
    redelivered header task completes the join without waiting for the claim to lapse."""
    group_id = gid()
    other = RedisResultBackend(REDIS_URL)
    try:
        backend.set_chord_size(group_id, 1)
        assert backend.chord_part_return(group_id, "t0", 0, "SUCCESS", 1) is not None
        other.chord_release(group_id)  # not its claim: nothing happens
        assert other.chord_part_return(group_id, "t0", 0, "SUCCESS", 1) is None
        backend.chord_release(group_id)
        assert not shared.exists(f"celery-taskset-meta-{group_id}.c")
        assert other.chord_part_return(group_id, "t0", 0, "SUCCESS", 1) == [("t0", "SUCCESS", 1)]
        other.chord_done(group_id)
    finally:
        other.close()


def test_sending_a_chord_again_starts_a_new_join(backend: RedisResultBackend) -> None:
    group_id = gid()
    backend.set_chord_size(group_id, 1)
    assert backend.chord_part_return(group_id, "t0", 0, "SUCCESS", 1) is not None
    backend.chord_done(group_id)
    backend.set_chord_size(group_id, 1)  # the same frozen chord, applied again
    assert backend.chord_part_return(group_id, "t0", 0, "SUCCESS", 2) == [("t0", "SUCCESS", 2)]
    backend.chord_done(group_id)


def test_chord_keys_and_saved_groups_expire_with_results(shared: redis.Redis) -> None:
    group_id = gid()
    b = RedisResultBackend(REDIS_URL, {"result_expires": 120})
    try:
        b.save_group(group_id, [[group_id, None], [[["t0", None], None]]])
        b.set_chord_size(group_id, 2)
        b.chord_part_return(group_id, "t0", 0, "SUCCESS", 1)
        prefix = f"celery-taskset-meta-{group_id}"
        for key in (prefix, prefix + ".s", prefix + ".j", prefix + ".d"):
            assert 100 < shared.ttl(key) <= 120, key
    finally:
        b.close()


def wait_gone(client: redis.Redis, key: str, within: float) -> None:
    """Until `key` has expired (a bounded wait on Redis's own clock)."""
    deadline = time.monotonic() + within
    while client.exists(key):
        if time.monotonic() > deadline:
            raise AssertionError(f"{key} did not expire within {within} s")
        time.sleep(0.02)


# -- the join, shared with Celery's backend ------------------------------------------------------------
def test_celery_and_millpond_write_the_same_join(
    backend: RedisResultBackend, celery_join: CeleryJoin, shared: redis.Redis
) -> None:
    ours, theirs = gid(), gid()
    body = celery_join.body()
    backend.set_chord_size(ours, 3)
    celery_join.app.backend.set_chord_size(theirs, 3)
    for i in (0, 1):
        backend.chord_part_return(ours, f"t{i}", i, "SUCCESS", value(i))
        celery_join.part(theirs, f"t{i}", i, value(i), body)
    assert layout(shared, ours) == layout(shared, theirs) == {".s": "string", ".j": "zset",
                                                                 ".d": "set"}  # fmt: skip
    for suffix, read in ((".s", "get"), (".d", "smembers")):
        assert getattr(shared, read)(f"celery-taskset-meta-{ours}{suffix}") == getattr(
            shared, read
        )(f"celery-taskset-meta-{theirs}{suffix}")

    def records(g: str) -> list[tuple[Any, float]]:
        raw = shared.zrange(f"celery-taskset-meta-{g}.j", 0, -1, withscores=True)
        return [(json.loads(member), score) for member, score in raw]

    assert records(ours) == records(theirs)
    for g in (ours, theirs):
        for suffix in (".s", ".j", ".d"):
            assert 500 < shared.ttl(f"celery-taskset-meta-{g}{suffix}") <= 600


def test_a_join_started_by_millpond_is_completed_by_celery(
    backend: RedisResultBackend, celery_join: CeleryJoin, shared: redis.Redis
) -> None:
    group_id = gid()
    body = celery_join.body()
    backend.set_chord_size(group_id, 3)
    assert backend.chord_part_return(group_id, "t0", 0, "SUCCESS", 10) is None
    celery_join.part(group_id, "t2", 2, 12, body)
    assert celery_join.sent() == []
    # millpond's copy of a part Celery returned counts once; Celery's copy of millpond's too
    assert backend.chord_part_return(group_id, "t2", 2, "SUCCESS", 12) is None
    celery_join.part(group_id, "t0", 0, 10, body)
    assert celery_join.sent() == []
    celery_join.part(group_id, "t1", 1, 11, body)
    assert celery_join.sent() == [("proj.tsum", [[10, 11, 12]])]
    assert shared.get(f"celery-taskset-meta-{group_id}.c") == b"done"
    # millpond's late copy is ignored too: the body went out once
    assert backend.chord_part_return(group_id, "t1", 1, "SUCCESS", 11) is None


def test_a_join_started_by_celery_is_completed_by_millpond(
    backend: RedisResultBackend, celery_join: CeleryJoin, shared: redis.Redis
) -> None:
    group_id = gid()
    body = celery_join.body()
    celery_join.app.backend.set_chord_size(group_id, 2)
    celery_join.part(group_id, "t1", 1, "b", body)
    parts = backend.chord_part_return(group_id, "t0", 0, "SUCCESS", "a")
    assert parts == [("t0", "SUCCESS", "a"), ("t1", "SUCCESS", "b")]
    backend.chord_done(group_id)
    # Celery's late copy of a part sees the done marker and sends nothing
    celery_join.part(group_id, "t0", 0, "a", body)
    assert celery_join.sent() == []
    assert shared.get(f"celery-taskset-meta-{group_id}.c") == b"done"


def test_celery_reads_a_failed_part_millpond_returned(
    backend: RedisResultBackend, celery_join: CeleryJoin, shared: redis.Redis
) -> None:
    """Celery completes a join in which a millpond part failed: it fails the body with a
    ChordError naming that task (and sends no body)."""
    from celery.exceptions import ChordError
    from celery.result import AsyncResult

    group_id = gid()
    body = celery_join.body()
    backend.set_chord_size(group_id, 2)
    error = {"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"}
    backend.chord_part_return(group_id, "bad", 0, "FAILURE", error)
    celery_join.part(group_id, "good", 1, 1, body)
    assert celery_join.sent() == []
    failed = AsyncResult(body["options"]["task_id"], app=celery_join.app)
    with pytest.raises(ChordError, match=r"Dependency bad raised ValueError\('boom'\)"):
        failed.get(timeout=5)
    failed.forget()


def test_a_claim_celery_held_passes_to_millpond_when_it_lapses(
    backend: RedisResultBackend, shared: redis.Redis
) -> None:
    """A Celery worker that claimed the join (its token, with an expiry) and died."""
    group_id = gid()
    backend.set_chord_size(group_id, 1)
    claim = f"celery-taskset-meta-{group_id}.c"
    shared.set(claim, uuid.uuid4().hex, px=300)
    assert backend.chord_part_return(group_id, "t0", 0, "SUCCESS", 1) is None
    wait_gone(shared, claim, within=10)
    assert backend.chord_part_return(group_id, "t0", 0, "SUCCESS", 1) == [("t0", "SUCCESS", 1)]
    backend.chord_done(group_id)


def test_a_claim_millpond_held_passes_to_celery_when_it_lapses(
    celery_join: CeleryJoin, shared: redis.Redis
) -> None:
    group_id = gid()
    body = celery_join.body()
    dead = RedisResultBackend(REDIS_URL)
    dead.claim_ttl = 0.3
    try:
        dead.set_chord_size(group_id, 2)
        dead.chord_part_return(group_id, "t0", 0, "SUCCESS", 1)
        assert dead.chord_part_return(group_id, "t1", 1, "SUCCESS", 2) is not None
        celery_join.part(group_id, "t1", 1, 2, body)  # the claim still holds: nothing sent
        assert celery_join.sent() == []
        wait_gone(shared, f"celery-taskset-meta-{group_id}.c", within=10)
        celery_join.part(group_id, "t1", 1, 2, body)  # the redelivered task, on a Celery worker
        assert celery_join.sent() == [("proj.tsum", [[1, 2]])]
    finally:
        dead.close()


# -- saved groups ----------------------------------------------------------------------------------
def test_groups_saved_by_either_side_restore_on_the_other(
    backend: RedisResultBackend, celery_join: CeleryJoin, shared: redis.Redis
) -> None:
    from celery.result import AsyncResult, GroupResult

    app = celery_join.app
    theirs = GroupResult(gid(), [AsyncResult("a", app=app), AsyncResult("b", app=app)], app=app)
    theirs.save()
    assert backend.restore_group(theirs.id) == [[theirs.id, None], [[["a", None], None],
                                                                   [["b", None], None]]]  # fmt: skip
    ours = gid()
    backend.save_group(ours, [[ours, None], [[["c", None], None], [["d", ["c", None]], None]]])
    restored = GroupResult.restore(ours, app=app)
    assert restored is not None
    assert [r.id for r in restored.results] == ["c", "d"]
    assert json.loads(shared.get(f"celery-taskset-meta-{ours}") or b"")["result"][0] == [ours, None]
    backend.forget_group(ours)
    assert GroupResult.restore(ours, app=app) is None
    assert backend.restore_group(ours) is None
    theirs.delete()


# -- a worker on Redis -----------------------------------------------------------------------------
def test_a_join_claimed_by_a_worker_that_died_is_completed_by_its_redelivered_task(
    shared: redis.Redis, start_worker: Any
) -> None:
    """A worker returned the last part, claimed the join and died before sending the body: the
    header tasks' messages come back, find their results stored and the join claimed, wait for
    the claim to lapse, and one of them sends the body, once."""
    from millpond import Millpond, chord
    from millpond.contracts.backend import ResultMeta
    from millpond.states import TaskState

    queue = f"chord-test-q-{uuid.uuid4().hex[:10]}"
    app = Millpond("chords", broker_url=REDIS_URL, default_queue=queue, queues=[queue])
    dead = RedisResultBackend(REDIS_URL)
    dead.claim_ttl = 2.0
    try:
        ran: list[list[int]] = []
        part = app.task(name="chords.part")(lambda x: x)
        body = app.task(name="chords.body")(lambda values: ran.append(values) or sum(values))
        result = chord([part.s(1), part.s(2)], body.s())()
        header = result.parent
        for index, (member, value) in enumerate(zip(header.results, (1, 2), strict=True)):
            dead.store(ResultMeta(task_id=member.id, status=TaskState.SUCCESS, result=value))
            parts = dead.chord_part_return(header.id, member.id, index, "SUCCESS", value)
        assert parts is not None  # it held the join, and died with it
        consumer = app.broker.consumer([queue], 10)
        try:  # its messages come back (delivered once, never acknowledged)
            deliveries = consumer.fetch(10, 2.0)
            assert len(deliveries) == 2
            for delivery in deliveries:
                consumer.reject(delivery, requeue=True)
        finally:
            consumer.close()
        # (the claim outlasts the worker's start: only waiting for it to lapse completes the join)
        start_worker(app, pool="threads", concurrency=2)
        assert result.get(timeout=20) == 3
        assert ran == [[1, 2]]
        wait_gone(shared, f"celery-taskset-meta-{header.id}.s", within=10)
        assert shared.get(f"celery-taskset-meta-{header.id}.c") == b"done"
    finally:
        dead.close()
        shared.delete(queue)
        app.close()
