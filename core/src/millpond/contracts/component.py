"""The worker-component contract: a part of the worker a plugin provides (millpond-control's
control plane, millpond-ratelimit's limits), one per installed `millpond.components` entry point:
the core imports none and pays nothing for one not installed. What a component changes in the loop
it changes on the loop's thread (`tend`, `Worker.call_soon`): `Worker.open_consumer` and `closing`
are the control plane's queue change, `concurrency` its pool resize.

Holding back (`holds_tasks = True`, the rate limits): a held job waits unacknowledged beside the
prefetch window (`window_room` widens the broker's), so it never stalls the unheld tasks behind
it, and starts before what is buffered: it came first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from millpond.contracts.pool import Job

if TYPE_CHECKING:
    from millpond.consume.worker import Worker


class WorkerComponent:
    """One part of a worker, built in `Worker.__init__` (fail on bad settings there: the worker
    must not start). `start` runs on the worker's thread, `stop` first in the shutdown while the
    broker connection is still open; every other method runs on the consumer loop's thread."""

    #: whether `discard` may say no to a task (the worker calls only those that override it)
    filters_tasks: bool = False
    #: whether `hold` may take a task (the worker calls the holding methods only on those)
    holds_tasks: bool = False

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def start(self) -> None:
        """Start what the component runs (threads, subscriptions); before the first fetch."""

    def stop(self) -> None:
        """Stop it; called once at shutdown, also when `start` never ran or failed."""

    def tend(self) -> None:
        """Once a loop turn, before the fetch: look after what the component keeps. While the
        worker is `closing`, a holder gives every held message back to the broker."""

    def discard(self, task_id: str, headers: Mapping[str, Any]) -> str | None:
        """Why the task must not run (it is answered as revoked with this reason), or None.
        Called on receipt and again before it starts: keep it cheap."""
        return None

    def describe_task(self, task_name: str) -> str:
        """A note on the task for the worker's start-up banner (its limit), or ""."""
        return ""

    # -- holding tasks back (holds_tasks = True) -------------------------------------------------
    def may_hold(self, task_name: str) -> bool:
        """Whether `hold` may take tasks of this name: their early ack (acks_late off) is then
        `release`'s to make, not the receipt's, so a held message can go back to the broker."""
        return False

    def hold(self, job: Job) -> bool:
        """Take a received job to start later (or to hand back to the broker); False: not held."""
        return False

    def release(self) -> Job | None:
        """A held job that may start now, or None; called only when the pool has a free slot."""
        return None

    def next_release(self) -> float | None:
        """Seconds until `release` may give a job (None: nothing held): the loop wakes for it."""
        return None

    def held(self) -> list[Job]:
        """A copy of every job held now (inspection lists them as reserved), from any thread."""
        return []

    def drain(self) -> list[Job]:
        """Let go of every held job (warm shutdown: the worker gives them back to the broker)."""
        return []

    def window_room(self, *, opening: bool = False) -> int:
        """Messages to let the broker deliver beyond the prefetch count, to hold beside it now
        (`opening`: for a new consumer, the most this component may want)."""
        return 0

    def beside_window(self) -> int:
        """Of the held messages, those that do not count against the prefetch count."""
        return 0
