"""millpond: a distributed task worker with a small core; pools and brokers are plugins.

    from millpond import Millpond

    app = Millpond("shop")

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

Importing millpond opens no connection and starts no thread.
"""

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

__version__ = "0.1.0"

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
