"""What the worker does with a task's canvas fields when the task has ended, as Celery's does: the
worker side of `millpond.contracts.canvas`, which the core's `Settler` calls.

On success: the `callbacks` are sent with the result prepended to their arguments (when there are
several, each group on its own and the others as one group), then the next step of the `chain`
(the last element of the reversed list) with the rest of it. On failure: errbacks that take
`(request, exc, traceback)` were already called in the execution unit (`inline_errbacks`,
right after the failure, where Celery calls them); the others are sent with the failed task's id;
and every later step of the chain that has a task id is stored FAILURE with the same error, so a
caller waiting on the chain's result is answered.

A chord's header task, whatever its outcome, returns its part to the result backend
(`chord_part_return`). The backend gives all the parts to exactly one caller, the one whose part
completed the join; that worker sends the body with the header's results, in order, or, when a part
failed, stores the body as FAILURE with a `ChordError` naming the task and runs the body's
errbacks. Then it tells the backend the chord is done, so a redelivered header task cannot send the
body again.

When a step cannot be sent (the broker stays away past its publish retries), it raises, and the
task's message goes back to its queue instead of being acknowledged (the core's `Settler`), so the
task runs again and the canvas goes on: at least once, as everywhere else; a chord's claim is
released first, so the redelivered header task can complete the join. A redelivered header task
that finds the join claimed by another worker (which may have died with its claim) has its message
wait in the broker until the claim lapses, marked to return its part again.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from millpond.contracts.backend import ChordPart, ResultMeta
from millpond.contracts.canvas import Canvas
from millpond.contracts.hooks import publishing_for
from millpond.contracts.pool import Job, Outcome
from millpond.produce.result import error_info, rebuild_exception
from millpond.produce.task import Request
from millpond.states import TaskState
from millpond.wire.protocol import REJOIN, Message
from millpond_canvas.signatures import Signature, _joined, chord, chord_backend, group

if TYPE_CHECKING:
    from millpond.produce.app import Millpond

log = structlog.get_logger("millpond.canvas")

#: header states that fail a chord (Celery's PROPAGATE_STATES)
_FAILING = frozenset({TaskState.FAILURE, TaskState.REVOKED})


class _ClaimedElsewhere(Exception):
    """A redelivered header task found its chord's join complete and claimed until `expires`."""

    def __init__(self, expires: float) -> None:
        super().__init__(f"the chord's join is claimed until {expires:.3f}")
        self.expires = expires


def _errback_called_in_place(app: Millpond, sig: Signature[Any]) -> bool:
    """Celery's rule: an errback is called in the failing worker with `(request, exc,
    traceback)` when its task is registered here, is not `bind=True`, and its function takes
    more than one positional argument after the signature's own; otherwise it is sent as a
    task with the failed task's id."""
    task = app.tasks.get(sig.name)
    if task is None or task.options.bind:
        return False
    try:
        parameters = inspect.signature(task.fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = 0
    for param in parameters:
        if param.kind is param.VAR_POSITIONAL:
            return True
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            positional += 1
    return positional - len(sig.args) > 1


def run_inline_errbacks(app: Millpond, request: Request, outcome: Outcome) -> None:
    """Call, here and now, the errbacks that take `(request, exc, traceback)` (in the execution
    unit that saw the failure, with the failed task's log context). One that raises is logged."""
    stored = error_info(outcome.exc_type or "TaskError", outcome.exc_module, outcome.stored_args)
    exc = rebuild_exception(stored)
    for item in request.errbacks or ():
        sig = Signature.from_dict(item, app)
        if not _errback_called_in_place(app, sig):
            continue
        try:
            app.tasks[sig.name](request, exc, outcome.traceback, *sig.args, **sig.kwargs)
        except Exception:
            log.exception("errback raised", errback=sig.name, task_id=request.id)


class CanvasSteps(Canvas):
    """The worker's side of the canvas; runs in the consumer loop's thread (`Settler`), but for
    `inline_errbacks`, which runs in the execution unit."""

    def inline_errbacks(self, request: Request, outcome: Outcome) -> None:
        run_inline_errbacks(self.app, request, outcome)

    # -- success ----------------------------------------------------------------------------------
    def after_success(self, job: Job, result: Any) -> list[Any]:
        """Send the callbacks and the next chain step; returns their results (as children)."""
        embed = job.embed or {}
        app = self.app
        sent: list[Any] = []
        root_id = job.root_id or job.task_id
        with publishing_for(job.carrier):
            callbacks = [Signature.from_dict(c, app) for c in embed.get("callbacks") or ()]
            if len(callbacks) > 1:
                # as Celery sends several: each group callback on its own, then the others
                # together as one group (so `children` have Celery's layout)
                plain = [c for c in callbacks if not isinstance(c, group)]
                callbacks = [c for c in callbacks if isinstance(c, group)]
                if plain:
                    callbacks.append(group(plain, app=app))
            for sig in callbacks:
                sent.append(
                    sig.apply_async((result,), parent_id=job.task_id, root_id=root_id).as_tuple()
                )
            steps = embed.get("chain") or []
            if steps:
                nxt = Signature.from_dict(steps[-1], app)
                rest = list(steps[:-1]) or None
                handle = nxt.apply_async(
                    (result,), chain=rest, parent_id=job.task_id, root_id=root_id
                )
                sent.append(handle.as_tuple())
        return sent

    # -- failure ----------------------------------------------------------------------------------
    def after_failure(self, job: Job, outcome: Outcome, error: Mapping[str, Any]) -> None:
        """Fail what the chain would have run, and send the errbacks that are tasks."""
        embed = job.embed or {}
        root_id = job.root_id or job.task_id
        with publishing_for(job.carrier):
            self._fail_chain(embed.get("chain") or [], error, outcome.traceback, job.task_id)
            for item in embed.get("errbacks") or ():
                sig = Signature.from_dict(item, self.app)
                if _errback_called_in_place(self.app, sig):
                    continue  # already called in the execution unit
                sig.apply_async((job.task_id,), parent_id=job.task_id, root_id=root_id)

    def _fail_chain(
        self, steps: Sequence[Any], error: Mapping[str, Any], traceback: str | None, by: str
    ) -> None:
        """Store FAILURE for every later step that has an id, as Celery does; a step that is a
        chord's header member (a chain in a header) also returns its failed part, or the
        chord would wait for it for ever; a chord step fails through its body."""
        pending = list(steps)
        while pending:
            sig = Signature.from_dict(pending.pop(), self.app)
            if isinstance(sig, chord):
                body = sig.body
                if body is not None:
                    pending.append(body)
                continue
            task_id = sig.options.get("task_id")
            if task_id:
                self._store(
                    task_id,
                    sig.name,
                    TaskState.FAILURE,
                    dict(error),
                    traceback,
                    reply_to=sig.options.get("reply_to"),  # rpc://: the caller of the chain
                )
            group_id, body = sig.options.get("group_id"), sig.options.get("chord")
            if task_id and group_id and body:
                index = sig.options.get("group_index")
                self._return_part(
                    group_id, task_id, index,
                    state=TaskState.FAILURE, stored=dict(error), body_data=body, by=by,
                )  # fmt: skip

    # -- chords -----------------------------------------------------------------------------------
    def chord_part(self, job: Job, state: TaskState, stored: Any, *, again: bool = False) -> Any:
        """Return this header task's part; send the body (or fail it) if it completed the join.
        Returns the body's result tuple when this call sent it, for the task's children.

        `again`: the part is returned by a redelivered message. If the join is complete but
        claimed, the claimant may have died with its claim: the message waits (`_wait_for_claim`)."""
        embed = job.embed or {}
        if not embed.get("chord") or not job.group_id:
            return None
        try:
            with publishing_for(job.carrier):
                return self._return_part(
                    job.group_id, job.task_id, job.group_index, state=state, stored=stored,
                    body_data=embed["chord"], by=job.task_id, again=again,
                )  # fmt: skip
        except _ClaimedElsewhere as claimed:
            self._wait_for_claim(job, claimed.expires)
            return None

    def _wait_for_claim(self, job: Job, expires: float) -> None:
        """Publish a copy of the message due when the claim lapses, marked (`REJOIN`) so the
        worker that gets it returns the part again; the worker then acks the original. Raises if
        the copy cannot be published: the original goes back to its queue instead."""
        if job.delivery is None:
            return  # acknowledged before it ran (acks_late off): nothing to hold
        message = job.delivery.message
        held = Message(
            body=message.body,
            headers={**message.headers, REJOIN: 1},
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            properties=dict(message.properties),
        )
        log.warning(
            "the chord this task completed is claimed by another worker, which may have "
            "died; its message waits for the claim to lapse and returns its part again",
            task_id=job.task_id,
            group_id=job.group_id,
            wait=round(max(0.0, expires - time.time()), 3),
        )
        self.app.broker.publish(job.queue, held, eta=expires + 0.25)

    def _return_part(
        self, group_id: str, task_id: str, index: int | None, *, state: TaskState, stored: Any,
        body_data: Any, by: str, again: bool = False,
    ) -> Any:  # fmt: skip
        """Return one part to the join; if it completed the join, send the body (or fail it)
        and end the join. `by` is the task on whose behalf this runs, the body's parent;
        `again`, as in `chord_part`."""
        backend = chord_backend(self.app)
        parts = backend.chord_part_return(group_id, task_id, index, str(state), stored)
        if parts is None:
            expires = backend.chord_claim_expires(group_id) if again else None
            if expires is not None:
                raise _ClaimedElsewhere(expires)
            return None
        body = Signature.from_dict(body_data, self.app)
        try:
            sent = self._complete(group_id, body, parts, by)
        except BaseException:
            backend.chord_release(group_id)  # the redelivered header task tries again
            raise
        backend.chord_done(group_id)
        return sent

    def _complete(
        self, group_id: str, body: Signature[Any], parts: list[ChordPart], by: str
    ) -> Any:
        failed = next((p for p in parts if p[1] in _FAILING), None)
        if failed is None:
            values = [value for _, _, value in parts]
            log.info(
                "chord complete; sending its body",
                group_id=group_id,
                parts=len(parts),
                body=body.name,
            )
            return body.apply_async((values,), parent_id=by).as_tuple()
        task_id, _, info = failed
        reason = f"Dependency {task_id} raised {_describe(info)}"
        log.error("chord failed; its body will not run", group_id=group_id, reason=reason)
        error = error_info("ChordError", "celery.exceptions", [reason])
        if isinstance(body, group):
            # Celery fails each task of a group body with the header's own error, and calls
            # the errbacks of each (its own, then the group's), so none of them waits for ever
            group_errbacks = list(body.options.get("link_error") or [])
            for member in body._members():
                errbacks = [*(member.options.get("link_error") or []), *group_errbacks]
                self._fail_body(member, dict(info) if isinstance(info, Mapping) else error,
                                errbacks)  # fmt: skip
        else:
            self._fail_body(body, error, list(body.options.get("link_error") or []))
        self._fail_chain(body.options.get("chain") or [], error, None, by)
        if _joined(body):
            # this chord is in an outer chord's header: its body's parts fail there too, or the
            # outer chord would wait for them for ever (each task of a group body where it says,
            # as Celery's do, else where the group says)
            for part in body._members() if isinstance(body, group) else [body]:
                place = part if _joined(part) else body
                if part_id := part.options.get("task_id"):
                    self._return_part(
                        place.options["group_id"], part_id, place.options.get("group_index"),
                        state=TaskState.FAILURE, stored=error, by=by,
                        body_data=place.options["chord"],
                    )  # fmt: skip
        return None

    def _fail_body(self, body: Signature[Any], error: dict[str, Any], errbacks: list[Any]) -> None:
        """Store a body that will not run as FAILURE with `error`, and run its errbacks once:
        in place those that take `(request, exc, traceback)`, as tasks the others."""
        body_id = body.options.get("task_id")
        if errbacks:
            message = error.get("exc_message")
            job = Job(
                task_id=body_id or "",
                task_name=body.name,
                args=tuple(body.args),
                kwargs=dict(body.kwargs),
                embed={"errbacks": errbacks},
            )
            failure = Outcome(
                state=TaskState.FAILURE,
                exc_type=str(error.get("exc_type") or "ChordError"),
                exc_module=error.get("exc_module"),
                exc_message=" ".join(map(str, message)) if isinstance(message, list) else "",
                exc_args=list(message) if isinstance(message, list) else None,
            )
            run_inline_errbacks(self.app, Request(job), failure)
            for item in errbacks:
                sig = Signature.from_dict(item, self.app)
                if not _errback_called_in_place(self.app, sig):
                    sig.apply_async((body_id,), parent_id=body_id)
        if body_id:
            self._store(body_id, body.name, TaskState.FAILURE, error, None)

    def _store(
        self,
        task_id: str,
        name: str,
        state: TaskState,
        result: Any,
        traceback: str | None,
        *,
        reply_to: str | None = None,
    ) -> None:
        backend = self.app.backend
        if backend is None:
            return
        backend.store(
            ResultMeta(
                task_id=task_id,
                status=state,
                result=result,
                traceback=traceback,
                date_done=datetime.now(UTC).isoformat(),
                name=name,
                reply_to=reply_to,
            )
        )


def _describe(info: Any) -> str:
    """A stored error as Celery's `repr` of it: `ValueError('boom')`."""
    if isinstance(info, Mapping):
        message = info.get("exc_message")
        args = ", ".join(repr(a) for a in message) if isinstance(message, list) else repr(message)
        return f"{info.get('exc_type', 'Exception')}({args})"
    return repr(info)
