"""The prefork pool passes the pool conformance kit."""

from __future__ import annotations

import pytest

from millpond.testing.pool_kit import PoolContract


class TestPreforkContract(PoolContract):
    @pytest.fixture
    def pool_name(self) -> str:
        return "prefork"

    @pytest.fixture
    def pool_options(self) -> dict[str, float]:
        return {"kill_grace": 0.5}
