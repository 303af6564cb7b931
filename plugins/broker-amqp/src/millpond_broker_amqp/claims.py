"""Claims on RabbitMQ (`millpond.contracts.broker.Claims`): exclusive queues as locks, a
last-value queue as state.

RabbitMQ has no `SET NX`, but it has the exclusive queue: only the connection that declared it may
use it, and a second connection's declare is refused with RESOURCE_LOCKED. So a claim is an
exclusive queue named after the key, declared with `x-expires` = the claim's ttl: redeclaring it
(what the holder does to extend it) counts as use, and RabbitMQ deletes it `ttl` after the last
one. A holder that dies frees its claims at once (its connection closes); one that is frozen loses
them after `ttl` (the queue expires) or after two missed AMQP heartbeats (the connection is
closed), whichever comes first, and its next claim call then fails instead of succeeding.

What RabbitMQ cannot tell is who holds another connection's queue: `holder()` returns an empty
owner for a claim held elsewhere (the scheduler records its leader's name in its state, which is
what `millpond beat --list` shows). And a claim ends with its holder's connection: a tick claim
does not outlive the replica that published the tick, so fencing rests on the leader's claim
connection being alive (the leader claims each tick on it before publishing), see docs/beat.md.

State is a durable queue per namespace holding at most one message (`x-max-length: 1`, the oldest
dropped): the whole map as JSON, read with basic.get and put back, replaced by publishing (with a
publisher confirm) the merged map.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import amqp
from amqp import exceptions as amqp_exc

from millpond.contracts.broker import Claims, Holder
from millpond.exceptions import BrokerError
from millpond_broker_amqp.connection import TRANSIENT, abandon, bounded, describe, open_connection
from millpond_broker_amqp.settings import AmqpConfig

T = TypeVar("T")
_MAX_NAME = 255


def _name(kind: str, key: str) -> str:
    name = f"millpond.{kind}.{key}"
    if len(name.encode()) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"millpond.{kind}.{key.encode()[:180].decode(errors='ignore')}.{digest}"


class AmqpClaims(Claims):
    #: a claim lives as long as its holder's connection (see the module docstring)
    outlives_holder: ClassVar[bool] = False

    def __init__(self, settings: AmqpConfig) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._conn: amqp.Connection | None = None
        self._chan: amqp.Channel | None = None
        self._pid = os.getpid()
        #: the claims this connection holds: key -> (owner, until when, monotonic)
        self._held: dict[str, tuple[str, float]] = {}

    # -- plumbing --------------------------------------------------------------------------------
    def _channel(self) -> amqp.Channel:
        if self._pid != os.getpid():  # forked: the parent's connection is not ours
            abandon(self._conn)
            self._conn = self._chan = None
            self._held.clear()
            self._pid = os.getpid()
        if self._conn is None:
            self._conn = open_connection(
                self.settings, heartbeat=self.settings.heartbeat, purpose="beat claims"
            )
            self._conn.confirm_publish = True  # state writes wait for the broker's confirm
        if self._chan is None or not self._chan.is_open:
            self._chan = self._conn.channel()
        return self._chan

    def _reset(self) -> None:
        abandon(self._conn)
        self._conn = self._chan = None
        self._held.clear()  # the exclusive queues went with the connection

    def _run(self, what: str, op: Callable[[amqp.Channel], T]) -> T:
        """`op` on the claims channel; a connection found dead (the server closes one that was
        idle for two heartbeats) is replaced and `op` tried once more on the new one. Every
        `op` here may be repeated: a declare, a read, a whole-map write to a last-value queue."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    chan = self._channel()
                    assert self._conn is not None
                    self._conn.heartbeat_tick()
                    with bounded(self._conn, self.settings.operation_timeout):
                        return op(chan)
                except BrokerError:
                    self._reset()
                    raise
                except TRANSIENT as exc:
                    self._reset()
                    if attempt == 2:
                        raise BrokerError(
                            f"{what} failed: RabbitMQ at {self.settings.safe_url}: {describe(exc)}"
                        ) from exc
            raise AssertionError("unreachable")  # pragma: no cover

    def _fresh_channel(self) -> amqp.Channel:
        """A new channel after the server closed one (RESOURCE_LOCKED, PRECONDITION_FAILED)."""
        assert self._conn is not None
        self._chan = self._conn.channel()
        return self._chan

    # -- the contract ----------------------------------------------------------------------------
    def acquire(self, key: str, owner: str, ttl: float) -> bool:
        now = time.monotonic()
        held = self._held.get(key)
        if held is not None and held[0] != owner and held[1] > now:
            return False
        queue, ms = _name("claim", key), max(1, int(ttl * 1000))

        def declare(chan: amqp.Channel) -> bool:
            args = {"x-expires": ms}
            try:
                chan.queue_declare(queue, exclusive=True, auto_delete=False, arguments=args)
            except amqp_exc.ResourceLocked:
                self._fresh_channel()
                return False
            except amqp_exc.PreconditionFailed:  # ours, declared with another ttl: redo it
                chan = self._fresh_channel()
                chan.queue_delete(queue)
                chan.queue_declare(queue, exclusive=True, auto_delete=False, arguments=args)
            return True

        got = self._run(f"claiming {key!r}", declare)
        if got:
            self._held[key] = (owner, now + ttl)
        return got

    def release(self, key: str, owner: str) -> None:
        held = self._held.get(key)
        if held is None or held[0] != owner:
            return
        self._run(f"releasing {key!r}", lambda chan: chan.queue_delete(_name("claim", key)))
        self._held.pop(key, None)

    def holder(self, key: str) -> Holder | None:
        held = self._held.get(key)
        now = time.monotonic()
        if held is not None and held[1] > now:
            return Holder(held[0], held[1] - now)

        def probe(chan: amqp.Channel) -> bool:
            try:
                chan.queue_declare(_name("claim", key), passive=True)
            except amqp_exc.ResourceLocked:
                self._fresh_channel()
                return True  # another connection holds it
            except amqp_exc.NotFound:
                self._fresh_channel()
                return False
            return held is not None  # ours, run out but not yet deleted by the server

        if self._run(f"reading {key!r}", probe):
            return Holder("", 0.0)  # held, by whom RabbitMQ does not say
        return None

    def load_state(self, namespace: str) -> dict[str, str]:
        return self._run(f"reading {namespace!r}", lambda chan: self._read(chan, namespace))

    def save_state(self, namespace: str, values: Mapping[str, str]) -> None:
        if not values:
            return

        def write(chan: amqp.Channel) -> None:
            merged = {**self._read(chan, namespace), **values}
            body = json.dumps(merged, sort_keys=True).encode()
            msg = amqp.Message(body, content_type="application/json", delivery_mode=2)
            chan.basic_publish(msg, exchange="", routing_key=_name("state", namespace))

        self._run(f"writing {namespace!r}", write)

    def _read(self, chan: amqp.Channel, namespace: str) -> dict[str, str]:
        queue = _name("state", namespace)
        chan.queue_declare(
            queue,
            durable=True,
            auto_delete=False,
            arguments={"x-max-length": 1, "x-overflow": "drop-head"},
        )
        msg: Any = chan.basic_get(queue, no_ack=False)
        if msg is None:
            return {}
        chan.basic_reject(msg.delivery_tag, requeue=True)
        try:
            data = json.loads(msg.body)
        except ValueError:
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except Exception:
                    abandon(self._conn)
            self._conn = self._chan = None
            self._held.clear()
