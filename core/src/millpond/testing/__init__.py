"""Conformance kits plugin authors subclass in their own test suites.

Each kit lives in its own module and imports pytest; nothing is imported here until a kit is asked
for, so `import millpond` never needs pytest.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BrokerContract", "PoolContract"]


def __getattr__(name: str) -> Any:
    if name == "BrokerContract":
        from millpond.testing.broker_kit import BrokerContract

        return BrokerContract
    if name == "PoolContract":
        from millpond.testing.pool_kit import PoolContract

        return PoolContract
    raise AttributeError(f"module 'millpond.testing' has no attribute {name!r}")
