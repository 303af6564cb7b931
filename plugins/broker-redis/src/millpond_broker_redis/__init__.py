"""Redis broker and result backend for millpond, sharing kombu's Redis layout with Celery.

    MILLPOND_BROKER_URL=redis://:password@localhost:6379/0

See docs/redis.md for the layout, leases (what "visibility" means here), delays and failure modes.

The public names are imported on first use (PEP 562), so the core can read the settings section
(`millpond_broker_redis.settings`) to validate `[redis]` without importing redis-py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from millpond import lazy_export

if TYPE_CHECKING:
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

_HOMES = {
    "RedisBroker": "millpond_broker_redis.broker",
    "RedisConfig": "millpond_broker_redis.config",
    "RedisConsumer": "millpond_broker_redis.consumer",
    "RedisResultBackend": "millpond_broker_redis.backend",
    "mask": "millpond_broker_redis.config",
    "parse": "millpond_broker_redis.config",
}


def __getattr__(name: str) -> Any:
    return lazy_export(globals(), _HOMES, name)
