"""The eventlet pool against real brokers: the shared green-pool checks (one greenthread owns the
consumer; heartbeats beat while tasks yield; a task that never yields starves them)."""

from __future__ import annotations

import pytest

from millpond_green.suite import GreenBrokerIOSuite

pytestmark = pytest.mark.green


class TestEventletBrokerIO(GreenBrokerIOSuite):
    pool = "eventlet"
