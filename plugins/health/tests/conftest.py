"""The health plugin's tests run workers with the workspace's observability fixtures."""

from tests.observability.conftest import obs_env, spawn

__all__ = ["obs_env", "spawn"]
