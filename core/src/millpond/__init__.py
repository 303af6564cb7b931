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

__all__ = [
    "AsyncResult",
    "MaxRetriesExceededError",
    "Millpond",
    "MillpondError",
    "Reject",
    "Request",
    "Retry",
    "SoftTimeLimitExceeded",
    "Task",
    "TaskError",
    "TimeLimitExceeded",
    "WorkerLostError",
    "__version__",
]

if TYPE_CHECKING:
    from millpond.app import Millpond as Millpond
    from millpond.exceptions import (
        MaxRetriesExceededError as MaxRetriesExceededError,
    )
    from millpond.exceptions import (
        MillpondError as MillpondError,
    )
    from millpond.exceptions import (
        Reject as Reject,
    )
    from millpond.exceptions import (
        Retry as Retry,
    )
    from millpond.exceptions import (
        SoftTimeLimitExceeded as SoftTimeLimitExceeded,
    )
    from millpond.exceptions import (
        TaskError as TaskError,
    )
    from millpond.exceptions import (
        TimeLimitExceeded as TimeLimitExceeded,
    )
    from millpond.exceptions import (
        WorkerLostError as WorkerLostError,
    )
    from millpond.result import AsyncResult as AsyncResult
    from millpond.task import Request as Request
    from millpond.task import Task as Task


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'millpond' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
