"""The solo pool passes the pool conformance kit."""

from __future__ import annotations

import pytest

from millpond.testing.pool_kit import PoolContract


class TestSoloContract(PoolContract):
    @pytest.fixture
    def pool_name(self) -> str:
        return "solo"
