"""The `rpc://` result backend entry point: not available yet, and says so clearly.

Celery's rpc backend sends each result to the `reply_to` queue of the caller that sent the task.
millpond's `ResultBackend.store(meta)` is not told that queue, so the backend cannot be built on
the current contract without guessing. Until it is, configuring `rpc://` fails at start-up with
the alternatives, instead of storing results nowhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

from millpond.broker import ResultBackend, ResultMeta
from millpond.exceptions import ConfigurationError

_MESSAGE = (
    "the rpc:// result backend is not available in millpond-broker-amqp yet; with a RabbitMQ "
    "broker set result_backend to redis://host:6379/0 (pip install millpond-broker-redis) or "
    "sqlite:///path/to/results.db, or ignore results (ignore_result = true)"
)


class RpcResultBackend(ResultBackend):
    """Refuses to be created (see the module docstring)."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        raise ConfigurationError(_MESSAGE)

    def store(self, meta: ResultMeta) -> NoReturn:
        raise ConfigurationError(_MESSAGE)

    def get(self, task_id: str, timeout: float | None) -> NoReturn:
        raise ConfigurationError(_MESSAGE)

    def peek(self, task_id: str) -> NoReturn:
        raise ConfigurationError(_MESSAGE)

    def forget(self, task_id: str) -> NoReturn:
        raise ConfigurationError(_MESSAGE)
