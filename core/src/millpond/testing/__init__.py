"""Conformance kits plugin authors subclass in their own test suites, and test helpers.

    from millpond.testing.pool_kit import PoolContract
    from millpond.testing.broker_kit import BrokerContract

Each kit lives in its own module and imports pytest; nothing is imported here, so
`import millpond` never needs pytest.
"""
