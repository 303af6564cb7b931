"""The `millpond.canvas` entry point: the canvas the core reaches through
`millpond.contracts.canvas`, the worker side (`steps`) with the producer's factories
(`signatures`) and Celery's built-in canvas tasks (`builtins`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from millpond_canvas.builtins import register_builtins
from millpond_canvas.results import GroupResult
from millpond_canvas.signatures import Signature, chunks, xmap, xstarmap
from millpond_canvas.steps import CanvasSteps

if TYPE_CHECKING:
    from millpond.produce.app import Millpond
    from millpond.produce.result import ResultNode
    from millpond.produce.task import Task


class CeleryCanvas(CanvasSteps):
    """Chains, groups, chords and callbacks in Celery's wire format, for one app."""

    def __init__(self, app: Millpond) -> None:
        super().__init__(app)
        register_builtins(app)

    def signature(
        self,
        task: str | Task[..., Any],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        immutable: bool = False,
    ) -> Signature[Any]:
        return Signature(task, args, kwargs, options, immutable=immutable, app=self.app)

    def from_dict(self, data: Mapping[str, Any]) -> Signature[Any]:
        return Signature.from_dict(data, self.app)

    def map(self, task: Task[..., Any], it: Iterable[Any], *, star: bool) -> xmap:
        return (xstarmap if star else xmap)(Signature(task), it, app=self.app)

    def chunks(self, task: Task[..., Any], it: Iterable[Any], n: int) -> chunks:
        return chunks(Signature(task), it, n, app=self.app)

    def group_result(
        self, group_id: str, results: Sequence[ResultNode], parent: ResultNode | None = None
    ) -> GroupResult:
        return GroupResult(group_id, results, self.app, parent)
