"""`RedisResultBackend`: Celery's Redis result layout, with waiting that wakes on completion.

A result is the JSON of `ResultMeta` under `celery-task-meta-<task_id>`, expiring after
`result_expires` seconds (0: never), and every store is also PUBLISHed on a channel of the same
name, exactly as Celery's Redis backend does, so Celery clients and millpond clients can read each
other's results. `get()` subscribes first and reads second, so a result stored in between is never
missed, then sleeps on the subscription: it wakes when the result arrives, not on a poll interval.

Chords join the way Celery's Redis backend joins them, on the same keys (`keys.py`): each header
part is added to a sorted set by its group index in one script, which also claims the join for
the one caller whose part completes it (a claim with an expiry, so it passes on if that worker
dies); the claim's holder sends the body and leaves a `done` marker. So a chord's header may run
on Celery workers, millpond workers or both, and its body is sent once, by whichever completes it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import redis
from redis.client import PubSub
from redis.commands.core import Script

from millpond.contracts.backend import CHORD_CLAIM_TTL, ChordPart, ResultBackend, ResultMeta
from millpond.exceptions import BackendError
from millpond.states import READY_STATES
from millpond_broker_redis import keys, scripts
from millpond_broker_redis.config import parse
from millpond_broker_redis.connection import (
    ACCESS_ERRORS,
    RETRYABLE,
    SCRIPT_ENCODER,
    Pools,
    access_problem,
)

log = logging.getLogger("millpond.broker.redis")

T = TypeVar("T")
#: how long one wait on the subscription lasts before re-checking the connection (get() with no
#: timeout waits in slices of this, so a dead connection is noticed and re-established)
_SLICE = 5.0
#: the least time a chord's `done` marker stays (Celery keeps it as long), so late copies of a
#: header part are ignored rather than starting the join again
_DONE_TTL = 300


def _decode(task_id: str, raw: bytes | str | None) -> ResultMeta | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise BackendError(
            f"stored result of task {task_id} is not JSON ({exc}); "
            f"inspect or delete the key {keys.result_key(task_id)!r}"
        ) from exc
    if not isinstance(data, dict):
        raise BackendError(f"stored result of task {task_id} is not a JSON object")
    data.setdefault("task_id", task_id)
    return ResultMeta.from_json(data)


class RedisResultBackend(ResultBackend):
    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self.cfg = parse(url, self.options)
        self.pools = Pools(self.cfg)
        #: on Redis Cluster a chord's keys carry its group id as their hash tag (one slot)
        self._layout = keys.Layout(self.cfg.cluster)
        #: a MULTI may only hold keys of one slot on a cluster, and a PUBLISH has none there
        self._multi = not self.cfg.cluster
        #: how long the join of a chord stays claimed by the caller that completed it
        self.claim_ttl = CHORD_CLAIM_TTL
        self._claims: dict[str, str] = {}  # group id -> token of the claim this process holds
        self._claims_lock = threading.Lock()
        self._chord_return = Script(SCRIPT_ENCODER, scripts.CHORD_RETURN)
        self._chord_done = Script(SCRIPT_ENCODER, scripts.CHORD_DONE)
        self._chord_release = Script(SCRIPT_ENCODER, scripts.CHORD_RELEASE)
        self._chord_claimed = Script(SCRIPT_ENCODER, scripts.CHORD_CLAIMED)

    def __repr__(self) -> str:
        return f"<RedisResultBackend {self.cfg.masked_url}>"

    def _retry(self, what: str, op: Callable[[redis.Redis], T]) -> T:
        deadline = time.monotonic() + self.cfg.publish_retry_timeout
        delay = 0.05
        while True:
            try:
                return op(self.pools.client())
            except ACCESS_ERRORS as exc:  # before RETRYABLE: WRONGPASS is a ConnectionError
                raise BackendError(access_problem(self.cfg, what, exc)) from exc
            except RETRYABLE as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BackendError(
                        f"{what} failed: Redis at {self.cfg.masked_url} did not answer for "
                        f"{self.cfg.publish_retry_timeout:g}s ({type(exc).__name__}: {exc}); "
                        "check that Redis is running and reachable"
                    ) from exc
                time.sleep(min(delay, left))
                delay = min(delay * 2, 2.0)
            except redis.RedisError as exc:
                raise BackendError(f"{what} failed: Redis said: {exc}") from exc

    def store(self, meta: ResultMeta) -> None:
        data = json.dumps(meta.to_json(), separators=(",", ":"))  # not JSON: TypeError (contract)
        key = keys.result_key(meta.task_id)
        expires = self.cfg.result_expires

        def op(c: redis.Redis) -> None:
            if not self._multi:  # stored first, so whoever hears the news can read it
                c.set(key, data, px=int(expires * 1000) if expires else None)
                c.publish(key, data)
                return
            with c.pipeline(transaction=True) as pipe:
                if expires:
                    pipe.set(key, data, px=int(expires * 1000))
                else:
                    pipe.set(key, data)
                pipe.publish(key, data)
                pipe.execute()

        self._retry(f"storing the result of task {meta.task_id}", op)

    def peek(self, task_id: str) -> ResultMeta | None:
        key = keys.result_key(task_id)
        raw = self._retry(f"reading the result of task {task_id}", lambda c: c.get(key))
        return _decode(task_id, raw)

    def get(self, task_id: str, timeout: float | None) -> ResultMeta | None:
        key = keys.result_key(task_id)
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        meta: ResultMeta | None = None
        failing_since: float | None = None
        while True:
            pubsub: PubSub | None = None
            try:
                pubsub = self.pools.client().pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.subscribe(key)
                meta = _decode(task_id, self.pools.client().get(key))
                failing_since = None
                while meta is None or meta.status not in READY_STATES:
                    left = _SLICE if deadline is None else deadline - time.monotonic()
                    if left <= 0:
                        return meta
                    event = pubsub.get_message(timeout=min(left, _SLICE))
                    if event is not None and event.get("type") == "message":
                        # pub/sub is global to the server, not per database: the message only
                        # wakes us; the result is read from this backend's own database
                        meta = _decode(task_id, self.pools.client().get(key)) or meta
                return meta
            except ACCESS_ERRORS as exc:
                raise BackendError(
                    access_problem(self.cfg, f"waiting for the result of task {task_id}", exc)
                ) from exc
            except RETRYABLE as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since >= self.cfg.publish_retry_timeout or (
                    deadline is not None and now >= deadline
                ):
                    raise BackendError(
                        f"waiting for the result of task {task_id} failed: Redis at "
                        f"{self.cfg.masked_url} is unreachable ({exc}); the task may still finish, "
                        "ask again later"
                    ) from exc
                time.sleep(0.1)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass

    def forget(self, task_id: str) -> None:
        key = keys.result_key(task_id)
        self._retry(f"forgetting the result of task {task_id}", lambda c: c.delete(key))

    def close(self) -> None:
        self.pools.close()

    # -- chords and groups, in Celery's layout ----------------------------------------------------
    supports_chords = True

    @property
    def _expires(self) -> int:
        """Seconds the chord keys and saved groups live (Celery's `result_chord_expires`, which
        defaults to `result_expires`); 0: for ever."""
        expires = self.cfg.result_expires
        return max(1, int(expires)) if expires else 0

    def set_chord_size(self, group_id: str, size: int) -> None:
        """`.s` = the size; a claim or `done` left by an earlier run of the same group id goes."""
        claim, size_key = self._layout.group(group_id, ".c"), self._layout.group(group_id, ".s")
        expires = self._expires

        def op(c: redis.Redis) -> None:
            with c.pipeline(transaction=True) as pipe:
                pipe.delete(claim)
                pipe.set(size_key, int(size), ex=expires or None)
                pipe.execute()

        self._retry(f"setting the size of chord {group_id}", op)

    def chord_part_return(
        self, group_id: str, task_id: str, index: int | None, state: str, result: Any
    ) -> list[ChordPart] | None:
        try:
            record = json.dumps([1, task_id, str(state), result])
        except (TypeError, ValueError) as exc:
            raise BackendError(
                f"the chord part of task {task_id} cannot be stored as JSON: {exc}"
            ) from exc
        score = "+inf" if index is None else str(int(index))
        token = uuid.uuid4().hex  # one per call: a retry of this call finds its own claim
        expires = self._expires
        names = [".j", ".t", ".s", ".d", "", ".c"]
        chord_keys = [self._layout.group(group_id, n) for n in names]
        claim_ms = max(1, int(self.claim_ttl * 1000))
        args: list[str | int] = [task_id, record, score, expires, expires, claim_ms, token]
        reply = self._retry(
            f"returning the chord part of task {task_id}",
            lambda c: self._chord_return(keys=chord_keys, args=args, client=c),
        )
        if len(reply) < 2:
            return None
        with self._claims_lock:
            self._claims[group_id] = token
        parts: list[ChordPart] = []
        for raw in reply[1]:
            try:
                _, part_id, part_state, value = json.loads(raw)
            except (TypeError, ValueError) as exc:
                raise BackendError(
                    f"chord {group_id} holds a part that is not a [1, id, state, result] "
                    f"JSON list: {raw!r:.200}"
                ) from exc
            parts.append((str(part_id), str(part_state), value))
        return parts

    def chord_done(self, group_id: str) -> None:
        with self._claims_lock:
            token = self._claims.pop(group_id, None)
        if token is None:
            return  # this process does not hold the join: nothing of it is ours to end
        chord_keys = [self._layout.group(group_id, n) for n in (".c", ".j", ".t", ".s", ".d")]
        args: list[str | int] = [token, max(_DONE_TTL, int(2 * self.claim_ttl))]
        ended = self._retry(
            f"ending the join of chord {group_id}",
            lambda c: self._chord_done(keys=chord_keys, args=args, client=c),
        )
        if not ended:
            log.warning(
                "the join of chord %s was claimed by another caller before this one ended it "
                "(its claim of %.0f s lapsed); its keys are left to that caller and to expiry",
                group_id,
                self.claim_ttl,
            )

    def chord_claim_expires(self, group_id: str) -> float | None:
        chord_keys = [self._layout.group(group_id, n) for n in (".c", ".j", ".t", ".s")]
        left = self._retry(
            f"reading the claim of chord {group_id}",
            lambda c: self._chord_claimed(keys=chord_keys, client=c),
        )
        return time.time() + int(left) / 1000 if int(left) >= 0 else None

    def chord_release(self, group_id: str) -> None:
        with self._claims_lock:
            token = self._claims.pop(group_id, None)
        if token is None:
            return
        claim = [self._layout.group(group_id, ".c")]
        self._retry(
            f"releasing the join of chord {group_id}",
            lambda c: self._chord_release(keys=claim, args=[token], client=c),
        )

    def save_group(self, group_id: str, value: Any) -> None:
        """`celery-taskset-meta-<id>` = `{"result": <the group's as_tuple>}`, as Celery saves it
        (and PUBLISHed, as Celery's every store is)."""
        try:
            data = json.dumps({"result": value})
        except (TypeError, ValueError) as exc:
            raise BackendError(f"group {group_id} cannot be stored as JSON: {exc}") from exc
        key = self._layout.group(group_id)
        expires = self._expires

        def op(c: redis.Redis) -> None:
            if not self._multi:
                c.set(key, data, ex=expires or None)
                c.publish(key, data)
                return
            with c.pipeline(transaction=True) as pipe:
                pipe.set(key, data, ex=expires or None)
                pipe.publish(key, data)
                pipe.execute()

        self._retry(f"saving group {group_id}", op)

    def restore_group(self, group_id: str) -> Any:
        key = self._layout.group(group_id)
        raw = self._retry(f"restoring group {group_id}", lambda c: c.get(key))
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise BackendError(
                f"saved group {group_id} is not JSON ({exc}); inspect or delete the key {key!r}"
            ) from exc
        if not isinstance(data, dict) or "result" not in data:
            raise BackendError(f"saved group {group_id} is not a {{'result': ...}} object")
        return data["result"]

    def forget_group(self, group_id: str) -> None:
        key = self._layout.group(group_id)
        self._retry(f"forgetting group {group_id}", lambda c: c.delete(key))
