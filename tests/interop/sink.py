"""Where the tasks of both apps leave what the tests check: one Redis list per key, each entry
JSON, so a test waits on BLPOP with a timeout instead of sleeping."""

from __future__ import annotations

import json
import os
from typing import Any

import redis

REDIS_URL = os.environ.get("INTEROP_REDIS_URL", "redis://127.0.0.1:6379/0")
_client: redis.Redis | None = None
_pid = -1


def client() -> redis.Redis:
    global _client, _pid
    if _client is None or _pid != os.getpid():
        _client, _pid = redis.Redis.from_url(REDIS_URL), os.getpid()
    return _client


def record(key: str, **entry: Any) -> None:
    redis_client = client()
    redis_client.rpush(key, json.dumps(entry))
    redis_client.expire(key, 3600)
