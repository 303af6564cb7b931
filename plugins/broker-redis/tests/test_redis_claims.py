"""Claims on Redis (`SET NX PX` leases, a state hash) pass the claims conformance kit."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from millpond.testing.claims_kit import ClaimsContract

pytestmark = pytest.mark.redis

REDIS_URL = "redis://127.0.0.1:6379/0"


class TestRedisClaims(ClaimsContract):
    @pytest.fixture
    def broker_url(self) -> str:
        return REDIS_URL

    @pytest.fixture
    def key(self) -> Iterator[str]:
        name = f"kit-claim-{uuid.uuid4().hex[:12]}"
        yield name
        client = redis.Redis.from_url(REDIS_URL)
        client.delete(name, f"{name}-other")
        client.close()
