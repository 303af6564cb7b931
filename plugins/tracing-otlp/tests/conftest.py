"""The exporter's end-to-end test runs workers with the workspace's observability fixtures."""

from tests.observability.conftest import obs_env, spawn

__all__ = ["obs_env", "spawn"]
