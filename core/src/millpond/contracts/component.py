"""The worker-component contract: a part of the worker that a plugin provides.

The control plane (remote control, revoke, mingle: the `millpond-control` package) is one. The
core worker knows nothing of it but this contract: it builds every installed component from the
`millpond.components` entry-point group when the worker is built, starts them after the pool
started and before the first fetch, asks each whether a task must be discarded before it runs, and
stops them first at shutdown. So the core neither imports a component nor pays for one that is
not installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from millpond.consume.worker import Worker


class WorkerComponent:
    """One part of a worker, built once per worker with the worker it belongs to.

    Built in `Worker.__init__` (read settings and fail on bad ones there: the worker must not
    start); `start` runs on the worker's thread, once the pool started and before anything is
    fetched; `stop` runs first in the shutdown, while the broker connection is still open.
    """

    #: whether `discard` may say no to a task (the worker calls only those that override it)
    filters_tasks: bool = False

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def start(self) -> None:
        """Start what the component runs (threads, subscriptions); before the first fetch."""

    def stop(self) -> None:
        """Stop it; called once at shutdown, also when `start` never ran or failed."""

    def discard(self, task_id: str, headers: Mapping[str, Any]) -> str | None:
        """Why the task must not run (it is answered as revoked with this reason), or None.

        Called for every task received and again before it starts: keep it cheap, and set
        `filters_tasks = True` on a component that overrides it.
        """
        return None
