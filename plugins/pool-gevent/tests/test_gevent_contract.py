"""The gevent pool passes the pool conformance kit, in a gevent-patched interpreter."""

from __future__ import annotations

import pytest

from millpond.testing.pool_kit import PoolContract

pytestmark = pytest.mark.green


class TestGeventContract(PoolContract):
    @pytest.fixture
    def pool_name(self) -> str:
        return "gevent"

    @pytest.fixture
    def concurrency(self) -> int:
        return 25
