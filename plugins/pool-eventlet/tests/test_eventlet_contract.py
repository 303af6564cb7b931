"""The eventlet pool passes the pool conformance kit, in a eventlet-patched interpreter."""

from __future__ import annotations

import pytest

from millpond.testing.pool_kit import PoolContract

pytestmark = pytest.mark.green


class TestEventletContract(PoolContract):
    @pytest.fixture
    def pool_name(self) -> str:
        return "eventlet"

    @pytest.fixture
    def concurrency(self) -> int:
        return 25
