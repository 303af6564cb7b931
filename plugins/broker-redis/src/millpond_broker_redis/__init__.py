"""Redis broker and result backend for millpond, sharing kombu's Redis layout with Celery.

    MILLPOND_BROKER_URL=redis://:password@localhost:6379/0

See docs/redis.md for the layout, leases (what "visibility" means here), delays and failure modes.
"""

from __future__ import annotations

from millpond_broker_redis.backend import RedisResultBackend
from millpond_broker_redis.broker import RedisBroker
from millpond_broker_redis.config import RedisConfig, mask, parse
from millpond_broker_redis.consumer import RedisConsumer

__all__ = [
    "RedisBroker",
    "RedisConfig",
    "RedisConsumer",
    "RedisResultBackend",
    "mask",
    "parse",
]
__version__ = "0.1.0"
