"""The canvas contract: chains, groups, chords and callbacks come from a plugin (millpond-canvas).

The core knows of the canvas only the message's canvas fields (`Job.embed`) and this class.
`Millpond.canvas` builds the `millpond.canvas` entry point once per app (the worker before its
pool starts, so Celery's canvas tasks are registered in every execution unit); without it this
base stands in: plain tasks run, the canvas fails naming the package to install.

The worker's settler calls it in the consumer loop's thread, only for a task with canvas fields:
succeeded: `after_success` (before the result is stored: its `children` are what this returns),
then `chord_part`; failed: `chord_part` with FAILURE, then `after_failure`; revoked: `chord_part`
with REVOKED; redelivered after it finished: `chord_part(..., again=True)`. A call that raises
leaves the message unacknowledged, so the task runs again and the canvas goes on (at least once).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from millpond.exceptions import PluginNotFound

if TYPE_CHECKING:
    from millpond.contracts.pool import Job, Outcome
    from millpond.produce.app import Millpond
    from millpond.produce.task import Request, Task
    from millpond.states import TaskState

MISSING = (
    "chains, groups, chords and callbacks need the canvas plugin, and none is installed; "
    "install it with: pip install millpond-canvas"
)


class Canvas:
    """An app's canvas; its first four methods serve `Task.s()`, `task.map()`, ... (typed there)."""

    def __init__(self, app: Millpond) -> None:
        self.app = app

    def signature(
        self,
        task: str | Task[..., Any],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        immutable: bool = False,
    ) -> Mapping[str, Any]:
        raise PluginNotFound(MISSING)

    def from_dict(self, data: Mapping[str, Any]) -> Mapping[str, Any]:
        """The signature a dict (from a message, or Celery's JSON) stands for, bound to the app."""
        raise PluginNotFound(MISSING)

    def map(self, task: Task[..., Any], it: Iterable[Any], *, star: bool) -> Mapping[str, Any]:
        """One message calling `task` on each item (`celery.map`; `celery.starmap` if `star`)."""
        raise PluginNotFound(MISSING)

    def chunks(self, task: Task[..., Any], it: Iterable[Any], n: int) -> Mapping[str, Any]:
        raise PluginNotFound(MISSING)

    def group_result(self, group_id: str, results: Sequence[Any], parent: Any = None) -> Any:
        """The result handle of a group (`GroupResult`) with these members' results."""
        raise PluginNotFound(MISSING)

    def after_success(self, job: Job, result: Any) -> list[Any]:
        """Send the callbacks and the next chain step; returns their result tuples."""
        raise PluginNotFound(MISSING)

    def after_failure(self, job: Job, outcome: Outcome, error: Mapping[str, Any]) -> None:
        """Fail the chain's later steps and send the errbacks that are tasks."""
        raise PluginNotFound(MISSING)

    def chord_part(self, job: Job, state: TaskState, stored: Any, *, again: bool = False) -> Any:
        """Return a chord header task's part, and send (or fail) the body if that completed the
        join: then the body's result tuple. `again`: from a redelivered message (a join another
        worker claimed is the plugin's to wait for)."""
        raise PluginNotFound(MISSING)

    def inline_errbacks(self, request: Request, outcome: Outcome) -> None:
        """Call the errbacks that take `(request, exc, traceback)`, in the execution unit right
        after the failure, as Celery does. Nothing here: `after_failure` reports them."""
