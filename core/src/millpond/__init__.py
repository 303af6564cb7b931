"""millpond: a distributed task worker with a small core; pools and brokers are plugins.

    from millpond import Millpond

    app = Millpond("shop")

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

Importing millpond opens no connection, starts no thread and imports nothing else until a name is
used: the `millpond` command must be able to monkey-patch (gevent, eventlet) before anything loads.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Millpond": "millpond.app",
    "AsyncResult": "millpond.result",
    "Request": "millpond.task",
    "Task": "millpond.task",
    "MaxRetriesExceededError": "millpond.exceptions",
    "MillpondError": "millpond.exceptions",
    "Reject": "millpond.exceptions",
    "Retry": "millpond.exceptions",
    "SoftTimeLimitExceeded": "millpond.exceptions",
    "TaskError": "millpond.exceptions",
    "TimeLimitExceeded": "millpond.exceptions",
    "WorkerLostError": "millpond.exceptions",
}

__all__ = [*sorted(_EXPORTS), "__version__"]

if TYPE_CHECKING:
    from millpond.app import Millpond
    from millpond.exceptions import (
        MaxRetriesExceededError,
        MillpondError,
        Reject,
        Retry,
        SoftTimeLimitExceeded,
        TaskError,
        TimeLimitExceeded,
        WorkerLostError,
    )
    from millpond.result import AsyncResult
    from millpond.task import Request, Task


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'millpond' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
