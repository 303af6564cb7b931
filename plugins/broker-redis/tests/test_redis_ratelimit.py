"""The global rate limit's token bucket in Redis: atomic under contention, refilled from Redis's
clock, expiring once it would be full again, found through the `millpond.limiters` entry point."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
import redis

from millpond_broker_redis import keys
from millpond_broker_redis.limiter import RedisRateLimiter
from millpond_ratelimit import limiter_for_url

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def limiter() -> RedisRateLimiter:
    found = limiter_for_url(REDIS_URL)
    assert isinstance(found, RedisRateLimiter)
    return found


@pytest.fixture
def name() -> Iterator[str]:
    bucket = f"test.ratelimit.{uuid.uuid4().hex[:10]}"
    yield bucket
    redis.Redis.from_url(REDIS_URL).delete(keys.rate_limit_key(bucket))


def test_only_one_of_many_concurrent_callers_gets_the_one_token(
    limiter: RedisRateLimiter, name: str
) -> None:
    """1/h: the bucket starts with one token and refills one an hour. Eight threads with their own
    limiters (as eight workers would be) ask 50 times each: exactly one ask is granted."""
    granted: list[float] = []
    start = threading.Barrier(8)

    def worker() -> None:
        own = RedisRateLimiter(REDIS_URL)
        start.wait()
        for _ in range(50):
            if own.acquire(name, 1 / 3600) == 0.0:
                granted.append(1)
        own.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(granted) == 1


def test_the_wait_says_when_the_next_token_is_there(limiter: RedisRateLimiter, name: str) -> None:
    assert limiter.acquire(name, 1 / 60) == 0.0
    wait = limiter.acquire(name, 1 / 60)
    assert 55.0 < wait <= 60.0
    ttl = redis.Redis.from_url(REDIS_URL).pttl(keys.rate_limit_key(name))
    assert 0 < ttl <= 61_000  # gone once a full bucket is all it would say


def test_a_refused_ask_takes_nothing(limiter: RedisRateLimiter, name: str) -> None:
    assert limiter.acquire(name, 2.0) == 0.0
    first = limiter.acquire(name, 2.0)
    second = limiter.acquire(name, 2.0)
    assert 0 < second <= first <= 0.5  # asking again did not push the next token further away


def test_bad_rates_are_refused(limiter: RedisRateLimiter, name: str) -> None:
    with pytest.raises(ValueError, match="rate must be > 0"):
        limiter.acquire(name, 0)
