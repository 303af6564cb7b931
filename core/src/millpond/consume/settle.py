"""Settle, a task's last step: store its outcome, send its retry (a new message, through the
producer's `send_task`) or its canvas's next steps, and ack, requeue or dead-letter its message.

All of it runs in the consumer loop's thread, the one owner of the broker connection. Acks wait
for the loop's next flush (before it fetches or waits): a burst of completions costs one round
trip. A retry or canvas step that cannot be sent puts the message back on its queue: none is lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from millpond.contracts.backend import ResultMeta
from millpond.contracts.broker import Consumer, Delivery
from millpond.contracts.hooks import publishing_for
from millpond.contracts.pool import Job, Outcome
from millpond.exceptions import TimeLimitExceeded, WorkerLostError
from millpond.produce.result import error_info
from millpond.states import TaskState
from millpond.wire.protocol import REJOIN, Message, encode_task

if TYPE_CHECKING:
    from millpond.config.settings import Settings
    from millpond.produce.app import Millpond
    from millpond.produce.task import Task

log = structlog.get_logger("millpond.worker")
#: the headers a message is built with; a retry carries the others over (a producer's own, beat's
#: entry name, stamps), as Celery's does, but for what a broker adds (`x-*`)
_BUILT_HEADERS = frozenset(encode_task("").headers)


def redelivered(job: Job) -> bool:
    """Whether the job's message came before (its task may have run, or returned its part)."""
    delivery = job.delivery
    return (
        job.delivery_count > 1 or bool(delivery and delivery.redelivered) or REJOIN in job.headers
    )


def ids(job: Job | Message) -> dict[str, str | None]:
    """The ids of a job, or of a message that did not decode, for log lines."""
    return {"task_id": job.task_id, "task_name": job.task_name}


def _failed_to(message: str, job: Job, exc: Exception) -> None:
    log.error(message, **ids(job), error=f"{type(exc).__name__}: {exc}")


class Acks:
    """What the worker holds unacknowledged, and the one writer of acks and rejections. A broker
    call that fails is logged: what the broker never saw acknowledged is redelivered."""

    #: the loop's consumer (set again when it reopens one on other queues)
    consumer: Consumer

    def __init__(self) -> None:
        #: deliveries held: buffered, running, or finished with their ack pending
        self.held = 0
        #: how long the loop waits after a broker call failed (doubles to 5 s, reset on success)
        self.backoff = 0.1
        self._pending: list[Delivery] = []

    def ack_now(self, deliveries: Sequence[Delivery]) -> None:
        self.held -= len(deliveries)
        self._call("ack", self.consumer.ack, deliveries)

    def ack_later(self, deliveries: Sequence[Delivery]) -> None:
        self.held -= len(deliveries)
        self._pending.extend(deliveries)

    def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            self._call("ack", self.consumer.ack, pending)

    def reject(self, delivery: Delivery, *, requeue: bool, reason: str) -> None:
        self.held -= 1
        self._call("reject", self.consumer.reject, delivery, requeue=requeue, reason=reason)

    def release(self, deliveries: Sequence[Delivery]) -> int:
        """Give unstarted deliveries back at once (warm shutdown); how many. If that fails they
        come back when the consumer closes."""
        if deliveries:
            self.held -= len(deliveries)
            self._call("release", self.consumer.release, deliveries)
        return len(deliveries)

    def dead_letter(self, delivery: Delivery, reason: str, job: Job | Message) -> None:
        """Reject to the dead-letter destination, with the one log line every dead letter gets."""
        log.error(
            "message rejected to the dead-letter queue",
            **ids(job),
            reason=reason,
            queue=delivery.queue,
        )
        self.reject(delivery, requeue=False, reason=reason)

    def _call(self, operation: str, call: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        try:
            call(*args, **kwargs)
        except Exception as exc:
            self.trouble(operation, exc)

    def trouble(self, operation: str, exc: Exception) -> None:
        log.warning(
            f"broker {operation} failed; retrying (unacknowledged messages are redelivered)",
            error=f"{type(exc).__name__}: {exc}",
            backoff=round(self.backoff, 2),
        )
        self.backoff = min(self.backoff * 2, 5.0)


class Settler:
    """Turns outcomes into stored results, retries and settled messages."""

    def __init__(self, app: Millpond, settings: Settings, acks: Acks) -> None:
        self.app, self.settings, self.acks = app, settings, acks
        #: the canvas plugin: called only for tasks with canvas fields
        self.canvas = app.canvas
        self.processed = 0

    def option(self, task: Task[..., Any] | None, name: str) -> Any:
        """The task's own option `name` (`max_deliveries`, `acks_late`, ...), else the setting of
        that name (an unknown task has only the setting)."""
        own = getattr(task.options, name) if task is not None else None
        return getattr(self.settings, name) if own is None else own

    def finish(self, job: Job, outcome: Outcome) -> None:
        """Store the outcome, then ack or put back the message (as the module docstring says)."""
        self.processed += 1
        state, reason = outcome.state, outcome.exc_message
        if state == TaskState.LOST:
            self._lost(job, outcome)
            return
        if state == TaskState.REJECTED:
            log.warning(
                "task rejected its message", **ids(job), reason=reason, requeue=outcome.requeue
            )
            self._put_back(job, outcome.requeue, f"rejected by the task: {reason}")
            return
        if state == TaskState.SUCCESS:
            sent = self._succeeded(job, outcome)
        elif state == TaskState.RETRY:
            sent = self._publish_retry(job, outcome)
        elif state == TaskState.REVOKED:
            error = error_info("TaskRevokedError", "celery.exceptions", [reason or "revoked"])
            self._store(job, TaskState.REVOKED, error)
            sent = not job.embed or self._chord_part(job, TaskState.REVOKED, error, again=False)
        elif state == TaskState.TIMEOUT:
            log.error("task over its hard time limit", **ids(job), time_limit=job.time_limit)
            self.failed(job, outcome, TimeLimitExceeded.__name__)
            sent = True  # its canvas was told of the failure where it could be: not run again
        else:  # FAILURE, or anything a third-party pool invents
            failure = f"{outcome.exc_type}: {reason}"
            log.error("task failed", **ids(job), error=failure, traceback=outcome.traceback)
            sent = self.failed(job, outcome, "TaskError")
        if sent:
            if job.delivery is not None:
                self.acks.ack_later([job.delivery])
        elif state == TaskState.RETRY:
            self._put_back(job, True, "retry could not be published")
        else:
            # never acknowledged with its next steps lost: it runs again, and the canvas goes on
            log.error(
                "the task's canvas could not go on; its message goes back to the queue", **ids(job)
            )
            self._put_back(job, True, "a canvas step could not be sent")

    def rejoin(self, job: Job, meta: ResultMeta) -> None:
        """A redelivered chord header task already finished (`meta` is in READY_STATES): return its
        part again (the backend counts it once), in case its worker died before it did."""
        self._chord_part(job, TaskState(meta.status), meta.result, again=True)

    def _put_back(self, job: Job, requeue: bool, reason: str) -> None:
        """Requeue or dead-letter the message (nothing to do if it was acked on receipt)."""
        if job.delivery is not None:
            self.acks.reject(job.delivery, requeue=requeue, reason=reason)

    def _lost(self, job: Job, outcome: Outcome) -> None:
        """The execution unit died: requeue (counted, capped) or fail, per the task's policy."""
        task = self.app.tasks.get(job.task_name)
        requeue = task is None or task.options.reject_on_worker_lost
        cap, count, delivery = self.option(task, "max_deliveries"), job.delivery_count, job.delivery
        log.error(
            "task lost its execution unit",
            **ids(job),
            reason=outcome.exc_message,
            requeue=requeue and count < cap,
            delivery_count=count,
        )
        if requeue and delivery is not None and count < cap:
            self._put_back(job, True, outcome.exc_message)
            return
        # failed (a final FAILURE also answers a caller waiting on the result after the cap)
        self.failed(job, outcome, WorkerLostError.__name__)
        if delivery is not None and not requeue:
            self.acks.ack_later([delivery])
        elif delivery is not None:
            reason = f"lost {count} times (max_deliveries={cap}): {outcome.exc_message}"
            self.acks.dead_letter(delivery, reason, job)

    # -- results ----------------------------------------------------------------------------------
    def _store(self, job: Job, status: TaskState, result: Any, **extra: Any) -> None:
        """Store a result (`extra`: traceback, children); a failure to store is logged only."""
        backend = self.app.backend
        if backend is None:
            return
        task = self.app.tasks.get(job.task_name)
        if status == TaskState.SUCCESS and self.option(task, "ignore_result"):
            return
        meta = ResultMeta(
            task_id=job.task_id,
            status=status,
            result=result,
            date_done=datetime.now(UTC).isoformat(),
            name=job.task_name,
            retries=job.retries,
            reply_to=job.reply_to,
            **extra,
        )
        try:
            try:
                backend.store(meta)
            except (TypeError, ValueError) as exc:
                log.error("task result cannot be stored as JSON", **ids(job), error=str(exc))
                why = [f"result is not JSON serializable: {exc}"]
                meta.status = TaskState.FAILURE
                meta.result = error_info("TypeError", "builtins", why)
                meta.traceback, meta.retries, meta.children = None, 0, []
                backend.store(meta)
        except Exception as exc:
            _failed_to(
                "cannot store task result; the task ran and its message is acknowledged", job, exc
            )

    def failed(self, job: Job, outcome: Outcome, exc_type: str) -> bool:
        """Store a failure, then its canvas steps as Celery does them; False if one failed."""
        info = error_info(outcome.exc_type or exc_type, outcome.exc_module, outcome.stored_args)
        self._store(job, TaskState.FAILURE, info, traceback=outcome.traceback)
        if not job.embed:
            return True
        joined = self._chord_part(job, TaskState.FAILURE, info, again=redelivered(job))
        failed, _ = self._canvas_step(
            "fail the rest of", job, self.canvas.after_failure, outcome, info
        )
        return joined and failed

    def _succeeded(self, job: Job, outcome: Outcome) -> bool:
        """Callbacks and the next chain step go out before the result is stored (its `children`
        name them, as Celery's do), then the chord's part. False when a step could not be sent."""
        children = outcome.children
        if job.embed:
            step = self.canvas.after_success
            ok, sent = self._canvas_step("send the next steps of", job, step, outcome.result)
            if not ok:
                return False
            children = [*children, *(sent or [])]
        self._store(job, TaskState.SUCCESS, outcome.result, children=children)
        return not job.embed or self._chord_part(
            job, TaskState.SUCCESS, outcome.result, again=redelivered(job)
        )

    def _chord_part(self, job: Job, state: TaskState, stored: Any, *, again: bool) -> bool:
        step = self.canvas.chord_part
        return self._canvas_step(
            "return its chord part for", job, step, state, stored, again=again
        )[0]

    def _canvas_step(
        self, what: str, job: Job, step: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> tuple[bool, Any]:
        """`step(job, ...)`: (True, what it returned), or (False, None) when it raised (a broker
        away past its retries, a backend that cannot join), logged with the task."""
        try:
            return True, step(job, *args, **kwargs)
        except Exception as exc:
            _failed_to(f"could not {what} the task's canvas", job, exc)
            return False, None

    # -- retries ----------------------------------------------------------------------------------
    def _publish_retry(self, job: Job, outcome: Outcome) -> bool:
        """Send the task again through `send_task`, as the same step of the same canvas, on
        behalf of the run that asks (its trace context)."""
        now = time.time()
        eta = outcome.eta if outcome.eta is not None else now + (outcome.countdown or 0.0)
        embed, retries = job.embed or {}, job.retries + 1
        log.info(
            "task will retry",
            **ids(job),
            retries=retries,
            countdown=round(eta - now, 3),
            reason=f"{outcome.exc_type}: {outcome.exc_message}",
        )
        try:
            with publishing_for(job.carrier):
                self.app.send_task(
                    job.task_name,
                    job.args,
                    job.kwargs,
                    queue=job.queue,
                    task_id=job.task_id,
                    expires=job.expires,
                    time_limit=job.time_limit,
                    soft_time_limit=job.soft_time_limit,
                    root_id=job.root_id,
                    parent_id=job.parent_id,
                    retries=retries,
                    eta=eta,
                    ignore_result=job.headers.get("ignore_result", False),
                    link=embed.get("callbacks"),
                    link_error=embed.get("errbacks"),
                    chain=embed.get("chain"),
                    chord=embed.get("chord"),
                    group_id=job.group_id,
                    group_index=job.group_index,
                    priority=job.delivery and job.delivery.message.properties.get("priority"),
                    headers={
                        k: v
                        for k, v in job.headers.items()
                        if k not in _BUILT_HEADERS and not k.startswith("x-")
                    },
                    reply_to=job.reply_to or "",  # the caller still waits ("": none does)
                )
        except Exception as exc:
            _failed_to("cannot publish the retry; the message goes back to the queue", job, exc)
            return False
        reason = error_info(outcome.exc_type or "Retry", outcome.exc_module, outcome.stored_args)
        self._store(job, TaskState.RETRY, reason)
        return True
