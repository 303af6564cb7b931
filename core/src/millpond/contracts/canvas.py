"""The canvas contract: chains, groups, chords and callbacks come from a plugin (millpond-canvas).

The core knows of the canvas only the message's canvas fields (`callbacks`, `errbacks`, `chain`,
`chord`: signature dicts in the body's embed, `millpond.wire.protocol`) and this contract. The
installed `millpond.canvas` entry point named `canvas` is a `Canvas` subclass; `Millpond.canvas`
builds it once per app, on first use, with the app (the worker builds it before its pool starts, so
the built-in tasks Celery's canvas sends, `celery.map`, `celery.chord_unlock`, ..., are registered
in every execution unit). With no plugin installed this base class stands in: plain tasks run, and
anything that needs the canvas fails naming the package to install.

The worker calls it in the consumer loop's thread (`millpond.consume.settle.Settler`), only for a
task whose message has canvas fields:

* succeeded: `after_success` sends the callbacks and the next chain step (before the result is
  stored, whose `children` are what it returns), then `chord_part` returns the chord's part;
* failed: `chord_part` with FAILURE, then `after_failure` (the chain's later steps, the errbacks);
* revoked: `chord_part` with REVOKED;
* redelivered after it already finished: `chord_part(..., again=True)`.

Any of these that raises leaves the task's message unacknowledged: it goes back to its queue, the
task runs again and the canvas goes on (at least once). `ClaimedElsewhere` is the one exception
that means something else: the message waits in the broker until the claim lapses.
`inline_errbacks` runs in the execution unit, right after a failure, where Celery calls the
errbacks that take `(request, exc, traceback)`.

The producer side (`Task.s()`, `app.signature()`, `task.map()`, ...) asks `signature`, `from_dict`,
`map` and `chunks`; what they return is millpond_canvas's `Signature` and its kinds, which those
methods' annotations name for the type checker.
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


class ClaimedElsewhere(Exception):
    """A redelivered chord header task found its chord's join complete and claimed: the worker
    holding the claim may be the one that died. Its message waits until `expires`, then returns
    its part again (and completes the join if the claim lapsed)."""

    def __init__(self, expires: float) -> None:
        super().__init__(f"the chord's join is claimed until {expires:.3f}")
        self.expires = expires


class Canvas:
    """The canvas of one app; every method but `inline_errbacks` fails until a plugin overrides
    it (see the module docstring for when each is called)."""

    def __init__(self, app: Millpond) -> None:
        self.app = app

    # -- producer side ---------------------------------------------------------------------------
    def signature(
        self,
        task: str | Task[..., Any],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        immutable: bool = False,
    ) -> Mapping[str, Any]:
        """A signature of `task` bound to the app."""
        raise PluginNotFound(MISSING)

    def from_dict(self, data: Mapping[str, Any]) -> Mapping[str, Any]:
        """The signature a dict (from a message, or Celery's JSON) stands for, bound to the app."""
        raise PluginNotFound(MISSING)

    def map(self, task: Task[..., Any], it: Iterable[Any], *, star: bool) -> Mapping[str, Any]:
        """One message calling `task` on each item (`celery.map`; `celery.starmap` if `star`)."""
        raise PluginNotFound(MISSING)

    def chunks(self, task: Task[..., Any], it: Iterable[Any], n: int) -> Mapping[str, Any]:
        """The items in chunks of `n`, one `celery.starmap` task per chunk, as a group."""
        raise PluginNotFound(MISSING)

    # -- worker side -----------------------------------------------------------------------------
    def after_success(self, job: Job, result: Any) -> list[Any]:
        """Send the callbacks and the next chain step; returns their result tuples."""
        raise PluginNotFound(MISSING)

    def after_failure(self, job: Job, outcome: Outcome, error: Mapping[str, Any]) -> None:
        """Fail the chain's later steps and send the errbacks that are tasks."""
        raise PluginNotFound(MISSING)

    def chord_part(self, job: Job, state: TaskState, stored: Any, *, again: bool = False) -> Any:
        """Return a chord header task's part; send (or fail) the body if it completed the join.
        Returns the body's result tuple when this call sent it. `again`: the part comes from a
        redelivered message, and a join claimed by another worker raises `ClaimedElsewhere`."""
        raise PluginNotFound(MISSING)

    def inline_errbacks(self, request: Request, outcome: Outcome) -> None:
        """Call, in the execution unit, the errbacks that take `(request, exc, traceback)`.
        Nothing here: without the plugin, `after_failure` reports the errbacks it cannot run."""
