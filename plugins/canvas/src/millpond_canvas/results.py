"""A group's result handle: its tasks' results, in the group's order, as Celery's `GroupResult`."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from millpond.produce.result import ResultNode, require_backend, result_from_tuple

if TYPE_CHECKING:
    from millpond.produce.app import Millpond


class GroupResult:
    """The results of a group's tasks, in the group's order.

    `save()` stores the group under its id (Celery's `celery-taskset-meta-<id>`), so another
    process can `GroupResult.restore(id, app)` it, as Celery's can.
    """

    def __init__(
        self, id: str, results: Sequence[ResultNode], app: Millpond,
        parent: ResultNode | None = None,
    ) -> None:  # fmt: skip
        self.id = id
        self.results = list(results)
        self.app = app
        self.parent = parent

    def __repr__(self) -> str:
        return f"<GroupResult {self.id} [{', '.join(r.id for r in self.results)}]>"

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[ResultNode]:
        return iter(self.results)

    def __getitem__(self, index: int) -> ResultNode:
        return self.results[index]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GroupResult) and (other.id, other.results) == (
            self.id,
            self.results,
        )

    def __hash__(self) -> int:
        return hash(self.id)

    def as_tuple(self) -> list[Any]:
        parent = self.parent.as_tuple() if self.parent is not None else None
        return [[self.id, parent], [r.as_tuple() for r in self.results]]

    @property
    def children(self) -> list[ResultNode]:
        return self.results

    def ready(self) -> bool:
        return all(r.ready() for r in self.results)

    def waiting(self) -> bool:
        return not self.ready()

    def successful(self) -> bool:
        return all(r.successful() for r in self.results)

    def failed(self) -> bool:
        return any(r.failed() for r in self.results)

    def completed_count(self) -> int:
        """How many of the tasks succeeded."""
        return sum(1 for r in self.results if r.successful())

    def get(self, timeout: float | None = None, propagate: bool = True) -> list[Any]:
        """Every task's value, in order; the first failure re-raises (unless `propagate=False`).
        `timeout` bounds the whole wait, not each task's."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[Any] = []
        for result in self.results:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            out.append(result.get(timeout=left, propagate=propagate))
        return out

    join = get

    def save(self) -> None:
        """Store the group (its id and its tasks' ids) in the result backend."""
        require_backend(self.app).save_group(self.id, self.as_tuple())

    @classmethod
    def restore(cls, group_id: str, app: Millpond) -> GroupResult | None:
        """The group saved under `group_id` (by millpond or Celery), or None."""
        stored = require_backend(app).restore_group(group_id)
        if stored is None:
            return None
        result = result_from_tuple(stored, app)
        return result if isinstance(result, GroupResult) else cls(group_id, [result], app)

    def forget(self) -> None:
        for result in self.results:
            result.forget()
        require_backend(self.app).forget_group(self.id)
