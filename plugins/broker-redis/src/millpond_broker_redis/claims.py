"""Claims on Redis (`millpond.contracts.broker.Claims`): `SET NX PX` leases and a hash of state.

A claim is one string key holding its owner, with a millisecond expiry Redis keeps: `SET key owner
NX PX ttl` takes it when it is free, and the owner extends it with `PEXPIRE` (both in one script,
so a claim that expires between the two steps is never extended by someone else). A holder that
dies stops extending, and Redis forgets the key `ttl` later. State is a hash per namespace.

Each call is tried once: a caller that cannot reach Redis must assume it holds nothing (the
scheduler steps down and tries again on its next round), so nothing here waits for a reconnect.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import redis
from redis.commands.core import Script

from millpond.contracts.broker import Claims, Holder
from millpond.exceptions import BrokerError
from millpond_broker_redis.connection import SCRIPT_ENCODER, Pools

T = TypeVar("T")

#: KEYS[1] the claim; ARGV[1] owner, ARGV[2] ttl in ms. 1 when the owner holds it afterwards.
ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
return 0
"""
#: KEYS[1] the claim; ARGV[1] owner: deleted only when that owner holds it
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisClaims(Claims):
    def __init__(self, pools: Pools, where: str) -> None:
        self.pools = pools
        self.where = where
        self._acquire = Script(SCRIPT_ENCODER, ACQUIRE)
        self._release = Script(SCRIPT_ENCODER, RELEASE)

    def _call(self, what: str, op: Callable[[redis.Redis], T]) -> T:
        try:
            return op(self.pools.client())
        except redis.RedisError as exc:
            raise BrokerError(f"{what} failed: Redis at {self.where}: {exc}") from exc

    def acquire(self, key: str, owner: str, ttl: float) -> bool:
        ms = max(1, int(ttl * 1000))
        got = self._call(
            f"claiming {key!r}",
            lambda c: self._acquire(keys=[key], args=[owner, ms], client=c),
        )
        return bool(got)

    def release(self, key: str, owner: str) -> None:
        self._call(
            f"releasing {key!r}", lambda c: self._release(keys=[key], args=[owner], client=c)
        )

    def holder(self, key: str) -> Holder | None:
        def read(c: redis.Redis) -> list[object]:
            pipe = c.pipeline(transaction=True)
            pipe.get(key)
            pipe.pttl(key)
            return pipe.execute()

        owner, ttl = self._call(f"reading {key!r}", read)
        if owner is None:
            return None
        text = owner.decode() if isinstance(owner, bytes) else str(owner)
        remaining = float(ttl) / 1000 if isinstance(ttl, int) and ttl >= 0 else 0.0
        return Holder(text, remaining)

    def load_state(self, namespace: str) -> dict[str, str]:
        raw = self._call(f"reading {namespace!r}", lambda c: c.hgetall(namespace))
        return {
            (k.decode() if isinstance(k, bytes) else str(k)): (
                v.decode() if isinstance(v, bytes) else str(v)
            )
            for k, v in raw.items()
        }

    def save_state(self, namespace: str, values: Mapping[str, str]) -> None:
        if values:
            mapping: Any = dict(values)  # redis-py wants a dict keyed by its own union of types
            self._call(f"writing {namespace!r}", lambda c: c.hset(namespace, mapping=mapping))
