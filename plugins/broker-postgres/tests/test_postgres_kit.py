"""The conformance kit against a private PostgreSQL (see conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest

from millpond.testing.broker_kit import BrokerContract

LEASE = {"lease_timeout": 1.0, "heartbeat_interval": 0.2}


class TestPostgresContract(BrokerContract):
    redelivery_slack = 3.0

    @pytest.fixture
    def broker_url(self, postgres_url: str) -> str:
        return postgres_url

    @pytest.fixture
    def broker_options(self) -> dict[str, Any]:
        return dict(LEASE)
