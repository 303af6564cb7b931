"""The millpond worker app of the events and Flower suites: the usual interop tasks plus ones that
end each way a task can (retried, rejected), so every task event has a task that sends it."""

from __future__ import annotations

from typing import Any

from millpond import Millpond
from millpond.exceptions import Reject
from tests.interop.millpond_app import register


def register_events(app: Millpond) -> Millpond:
    register(app)

    @app.task(name="interop.retry_once", bind=True, max_retries=3)
    def retry_once(self: Any, value: Any) -> Any:
        """Asks to run again once (task-retried), then returns `value`."""
        if self.request.retries == 0:
            raise self.retry(exc=KeyError("not yet"), countdown=0)
        return value

    @app.task(name="interop.reject")
    def reject(reason: str) -> None:
        """Rejects its message without a requeue (task-rejected)."""
        raise Reject(reason, requeue=False)

    return app


#: the worker's app: broker, backend and queues come from the MILLPOND_* variables
app = register_events(Millpond("interop"))
