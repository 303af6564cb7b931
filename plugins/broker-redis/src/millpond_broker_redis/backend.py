"""`RedisResultBackend`: Celery's Redis result layout, with waiting that wakes on completion.

A result is the JSON of `ResultMeta` under `celery-task-meta-<task_id>`, expiring after
`result_expires` seconds (0: never), and every store is also PUBLISHed on a channel of the same
name, exactly as Celery's Redis backend does, so Celery clients and millpond clients can read each
other's results. `get()` subscribes first and reads second, so a result stored in between is never
missed, then sleeps on the subscription: it wakes when the result arrives, not on a poll interval.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import redis
from redis.client import PubSub

from millpond.broker import READY_STATES, ResultBackend, ResultMeta
from millpond.exceptions import BackendError
from millpond_broker_redis import keys
from millpond_broker_redis.config import parse
from millpond_broker_redis.connection import RETRYABLE, Pools

log = logging.getLogger("millpond.broker.redis")

T = TypeVar("T")
#: how long one wait on the subscription lasts before re-checking the connection (get() with no
#: timeout waits in slices of this, so a dead connection is noticed and re-established)
_SLICE = 5.0


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

    def __repr__(self) -> str:
        return f"<RedisResultBackend {self.cfg.masked_url}>"

    def _retry(self, what: str, op: Callable[[redis.Redis], T]) -> T:
        deadline = time.monotonic() + self.cfg.publish_retry_timeout
        delay = 0.05
        while True:
            try:
                return op(self.pools.client())
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
        try:
            data = json.dumps(meta.to_json(), separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise BackendError(
                f"result of task {meta.task_id} cannot be stored as JSON: {exc}; "
                "return JSON-serialisable values from tasks"
            ) from exc
        key = keys.result_key(meta.task_id)
        expires = self.cfg.result_expires

        def op(c: redis.Redis) -> None:
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
