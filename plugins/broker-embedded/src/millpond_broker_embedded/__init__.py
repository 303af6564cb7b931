"""The embedded brokers: `memory://` for tests and docs, `sqlite://` for one machine.

They need no server and no third-party library, so `pip install millpond` alone (which depends on
this package) can run a worker. Each module is imported only when its URL scheme is configured
(through the `millpond.brokers` and `millpond.backends` entry points), never from here.
"""
