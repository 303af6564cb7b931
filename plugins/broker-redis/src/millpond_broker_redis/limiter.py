"""`RedisRateLimiter`: global rate limits, one token bucket per task for every worker.

A worker asks only when it holds a message of a globally limited task waiting for a token, and the
answer says how long to wait when there is none, so an idle task costs Redis nothing and a busy one
about one round trip per token (plus one per waiting worker per refill). The bucket lives under
`millpond:ratelimit:<task>` (see `keys.py`), refilled from Redis's clock in the `RATE_LIMIT` script.

Works with plain, TLS and sentinel URLs (the broker's own connection handling), not Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from redis.commands.core import Script

from millpond_broker_redis import keys, scripts
from millpond_broker_redis.config import parse
from millpond_broker_redis.connection import SCRIPT_ENCODER, Pools
from millpond_ratelimit import SharedLimiter


class RedisRateLimiter(SharedLimiter):
    schemes = ("redis", "rediss", "redis+sentinel", "redis-cluster", "rediss-cluster")

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self.cfg = parse(url, self.options)
        self.pools = Pools(self.cfg)
        self._script = Script(SCRIPT_ENCODER, scripts.RATE_LIMIT)

    def __repr__(self) -> str:
        return f"<RedisRateLimiter {self.cfg.masked_url}>"

    def acquire(self, name: str, rate: float, capacity: float = 1.0) -> float:
        if rate <= 0 or capacity < 1:
            raise ValueError(f"rate must be > 0 and capacity >= 1, got {rate}, {capacity}")
        reply = self._script(
            keys=[keys.rate_limit_key(name)],
            args=[repr(float(rate)), repr(float(capacity))],
            client=self.pools.client(),
        )
        return float(reply.decode() if isinstance(reply, bytes) else reply)

    def close(self) -> None:
        self.pools.close()
