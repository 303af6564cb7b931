"""Settle: the last step of a task's trip through the worker. Store its outcome, publish its
retry, send its canvas's next steps, and settle its message (ack, requeue, or dead-letter).

`Acks` is the ledger of what the worker holds unacknowledged, and the only writer of acks and
rejections: the consumer loop owns the broker connection, so everything here runs in its thread.
Acks are batched: they wait for the loop's next flush (before it fetches or waits on the broker),
so a burst of completions costs one round trip, and no ack waits on anything but the current turn.

`Settler.finish` decides what an `Outcome` means for the message and the result store. A retry is a
new message published through the app's one publish path (`Millpond.publish`: hooks, signing,
broker); if that publish fails the original message goes back to its queue, so nothing is lost.
A task with canvas fields has its next steps sent through the canvas plugin
(`millpond.contracts.canvas`); a step that cannot be sent puts the message back the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from millpond.contracts.backend import ResultMeta
from millpond.contracts.broker import Consumer, Delivery
from millpond.contracts.canvas import ClaimedElsewhere
from millpond.contracts.pool import Job, Outcome
from millpond.exceptions import TimeLimitExceeded, WorkerLostError
from millpond.produce.result import error_info
from millpond.states import TaskState
from millpond.wire.protocol import REJOIN, Message, encode_task

if TYPE_CHECKING:
    from millpond.config.settings import Settings
    from millpond.produce.app import Millpond

log = structlog.get_logger("millpond.worker")


def redelivered(job: Job) -> bool:
    """Whether the job's message came before (its task may have run, or returned its part)."""
    delivery = job.delivery
    return bool(
        job.delivery_count > 1
        or (delivery is not None and delivery.redelivered)
        or REJOIN in job.headers
    )


class Acks:
    """The deliveries this worker holds unacknowledged, and the acks waiting for the next flush.

    A broker call that fails is logged and retried by the broker itself: what it never saw
    acknowledged is redelivered (at least once)."""

    #: the consumer loop's one consumer (set again when it reopens one on other queues)
    consumer: Consumer

    def __init__(self, consumer: Consumer | None = None) -> None:
        if consumer is not None:
            self.consumer = consumer
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
        """Requeue or dead-letter a delivery (counted as no longer held)."""
        self.held -= 1
        self._call("reject", self.consumer.reject, delivery, requeue=requeue, reason=reason)

    def release(self, deliveries: Sequence[Delivery]) -> int:
        """Give unstarted deliveries back to the broker at once (warm shutdown); how many went.
        Still unacknowledged if that fails: they come back when the consumer closes."""
        if deliveries:
            self.held -= len(deliveries)
            self._call("release", self.consumer.release, deliveries)
        return len(deliveries)

    def dead_letter(
        self, delivery: Delivery, reason: str, *, task_id: str | None, task_name: str | None
    ) -> None:
        """Reject to the dead-letter destination, with the one log line every dead letter gets."""
        log.error(
            "message rejected to the dead-letter queue",
            reason=reason,
            task_id=task_id,
            task_name=task_name,
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
        self.app = app
        self.settings = settings
        self.acks = acks
        #: the canvas plugin (millpond.contracts.canvas): called only for tasks with canvas fields
        self.canvas = app.canvas
        self.processed = 0

    def finish(self, job: Job, outcome: Outcome) -> None:
        """Store the outcome and settle the message: acknowledged at the loop's next flush, or
        put back to its queue when what must follow the task (a retry, a canvas step) failed."""
        self.processed += 1
        state = outcome.state
        if state == TaskState.SUCCESS:
            sent = self._succeeded(job, outcome)
        elif state == TaskState.RETRY:
            if not self._publish_retry(job, outcome):
                self._put_back(job, True, "retry could not be published")
                return
            sent = True
        elif state == TaskState.REJECTED:
            log.warning(
                "task rejected its message",
                task_id=job.task_id,
                task_name=job.task_name,
                reason=outcome.exc_message,
                requeue=outcome.requeue,
            )
            self._put_back(job, outcome.requeue, f"rejected by the task: {outcome.exc_message}")
            return
        elif state == TaskState.LOST:
            self._lost(job, outcome)
            return
        elif state == TaskState.REVOKED:
            error = error_info(
                "TaskRevokedError", "celery.exceptions", [outcome.exc_message or "revoked"]
            )
            self._store(job, TaskState.REVOKED, error)
            sent = (
                not job.embed
                or self._canvas_step(
                    "return its chord part for",
                    lambda: self.canvas.chord_part(job, TaskState.REVOKED, error),
                    job,
                )[0]
            )
        elif state == TaskState.TIMEOUT:
            log.error(
                "task over its hard time limit",
                task_id=job.task_id,
                task_name=job.task_name,
                time_limit=job.time_limit,
            )
            self._store_error(job, outcome, TimeLimitExceeded.__name__)
            sent = True  # its canvas was told of the failure where it could be: not run again
        else:  # FAILURE, or anything a third-party pool invents
            log.error(
                "task failed",
                task_id=job.task_id,
                task_name=job.task_name,
                error=f"{outcome.exc_type}: {outcome.exc_message}",
                traceback=outcome.traceback,
            )
            sent = self._store_error(job, outcome, outcome.exc_type or "TaskError")
        if not sent:
            # never acknowledged with its next steps lost: it runs again, and the canvas goes on
            log.error(
                "the task's canvas could not go on; its message goes back to the queue",
                task_id=job.task_id,
                task_name=job.task_name,
            )
            self._put_back(job, True, "a canvas step could not be sent")
        elif job.delivery is not None:
            self.acks.ack_later([job.delivery])

    def rejoin(self, job: Job, meta: ResultMeta) -> None:
        """A redelivered chord header task that already finished: return its part again (the
        backend counts it once), in case its worker died before it did."""
        try:
            state = TaskState(meta.status)
        except ValueError:
            state = TaskState.FAILURE
        self._canvas_step(
            "return again the chord part of",
            lambda: self.canvas.chord_part(job, state, meta.result, again=True),
            job,
        )

    def _put_back(self, job: Job, requeue: bool, reason: str) -> None:
        """Requeue or dead-letter the message (nothing to do if it was acked on receipt)."""
        if job.delivery is not None:
            self.acks.reject(job.delivery, requeue=requeue, reason=reason)

    def _lost(self, job: Job, outcome: Outcome) -> None:
        """The execution unit died: requeue (counted, capped) or fail, per the task's policy."""
        task = self.app.tasks.get(job.task_name)
        requeue = task is None or task.options.reject_on_worker_lost
        cap = self.settings.max_deliveries
        capped = job.delivery_count >= cap
        log.error(
            "task lost its execution unit",
            task_id=job.task_id,
            task_name=job.task_name,
            reason=outcome.exc_message,
            requeue=requeue and not capped,
            delivery_count=job.delivery_count,
        )
        delivery = job.delivery
        if requeue and delivery is not None and not capped:
            self._put_back(job, True, outcome.exc_message)
            return
        # failed (a final FAILURE also answers a caller waiting on the result after the cap)
        self._store_error(job, outcome, WorkerLostError.__name__)
        if delivery is not None and not requeue:
            self.acks.ack_later([delivery])
        elif delivery is not None:
            reason = (
                f"lost {job.delivery_count} times (max_deliveries={cap}): {outcome.exc_message}"
            )
            self.acks.dead_letter(delivery, reason, task_id=job.task_id, task_name=job.task_name)

    # -- results ----------------------------------------------------------------------------------
    def _store(
        self,
        job: Job,
        status: TaskState,
        result: Any,
        traceback: str | None = None,
        children: list[Any] | None = None,
    ) -> None:
        backend = self.app.backend
        if backend is None:
            return
        if status == TaskState.SUCCESS:
            task = self.app.tasks.get(job.task_name)
            ignore = task.options.ignore_result if task is not None else None
            if ignore if ignore is not None else self.settings.ignore_result:
                return
        meta = ResultMeta(
            task_id=job.task_id,
            status=status,
            result=result,
            traceback=traceback,
            date_done=datetime.now(UTC).isoformat(),
            name=job.task_name,
            retries=job.retries,
            children=children or [],
            reply_to=job.reply_to,
        )
        try:
            try:
                backend.store(meta)
            except (TypeError, ValueError) as exc:
                log.error(
                    "task result cannot be stored as JSON",
                    task_id=job.task_id,
                    task_name=job.task_name,
                    error=str(exc),
                )
                meta.status, meta.traceback, meta.retries, meta.children = (
                    TaskState.FAILURE,
                    None,
                    0,
                    [],
                )
                meta.result = error_info(
                    "TypeError", "builtins", [f"result is not JSON serializable: {exc}"]
                )
                backend.store(meta)
        except Exception as exc:
            log.error(
                "cannot store task result; the task ran and its message is acknowledged",
                task_id=job.task_id,
                error=f"{type(exc).__name__}: {exc}",
            )

    def _store_error(self, job: Job, outcome: Outcome, exc_type: str) -> bool:
        """Store a failure; then what Celery does after one: the chord's part, the chain's later
        steps, the errbacks. Returns False when a canvas step could not be sent."""
        info = error_info(outcome.exc_type or exc_type, outcome.exc_module, outcome.stored_args)
        self._store(job, TaskState.FAILURE, info, outcome.traceback)
        if not job.embed:
            return True
        joined, _ = self._canvas_step(
            "return its chord part for",
            lambda: self.canvas.chord_part(job, TaskState.FAILURE, info, again=redelivered(job)),
            job,
        )
        failed, _ = self._canvas_step(
            "fail the rest of", lambda: self.canvas.after_failure(job, outcome, info), job
        )
        return joined and failed

    def _succeeded(self, job: Job, outcome: Outcome) -> bool:
        """Callbacks and the next chain step go out before the result is stored (so its
        `children` name them, as Celery's do), then the chord's part is returned. Returns False
        when a canvas step could not be sent."""
        if not job.embed:
            self._store(job, TaskState.SUCCESS, outcome.result, children=outcome.children)
            return True
        ok, sent = self._canvas_step(
            "send the next steps of", lambda: self.canvas.after_success(job, outcome.result), job
        )
        if not ok:
            return False
        children = [*outcome.children, *(sent or [])]
        self._store(job, TaskState.SUCCESS, outcome.result, children=children)
        return self._canvas_step(
            "return its chord part for",
            lambda: self.canvas.chord_part(
                job, TaskState.SUCCESS, outcome.result, again=redelivered(job)
            ),
            job,
        )[0]

    def _canvas_step(self, what: str, step: Callable[[], Any], job: Job) -> tuple[bool, Any]:
        """Run a canvas step; one that raises (a broker away past its retries, a backend that
        cannot join) is logged with the task and reported as (False, None). A chord claimed by
        another worker, which may have died, has the message wait in the broker until the
        claim lapses, marked so the worker that gets it returns the part again."""
        try:
            return True, step()
        except ClaimedElsewhere as claimed:
            if job.delivery is None:
                return True, None  # acknowledged before it ran (acks_late off): nothing to hold
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
                wait=round(max(0.0, claimed.expires - time.time()), 3),
            )
            try:
                self.app.broker.publish(job.queue, held, eta=claimed.expires + 0.25)
            except Exception as exc:
                log.error("could not hold the message for its chord", error=repr(exc))
                return False, None
            return True, None
        except Exception as exc:
            log.error(
                f"could not {what} the task's canvas",
                task_id=job.task_id,
                task_name=job.task_name,
                error=f"{type(exc).__name__}: {exc}",
            )
            return False, None

    # -- retries ----------------------------------------------------------------------------------
    def _publish_retry(self, job: Job, outcome: Outcome) -> bool:
        now = time.time()
        eta = outcome.eta if outcome.eta is not None else now + (outcome.countdown or 0.0)
        embed = job.embed or {}
        headers = {k: v for k, v in job.headers.items() if k == "ignore_result"}
        message = encode_task(
            job.task_name,
            job.args,
            job.kwargs,
            task_id=job.task_id,
            retries=job.retries + 1,
            eta=eta,
            expires=job.expires,
            time_limit=job.time_limit,
            soft_time_limit=job.soft_time_limit,
            root_id=job.root_id,
            parent_id=job.parent_id,
            origin=self.app.origin,
            sent_at=now,
            headers=headers,
            # the retry is the same step of the same canvas: it carries what comes after it
            callbacks=embed.get("callbacks"),
            errbacks=embed.get("errbacks"),
            chain=embed.get("chain"),
            chord=embed.get("chord"),
            group_id=job.group_id,
            group_index=job.group_index,
            reply_to=job.reply_to,  # the caller still waits for the result
        )
        log.info(
            "task will retry",
            task_id=job.task_id,
            task_name=job.task_name,
            retries=job.retries + 1,
            countdown=round(eta - now, 3),
            reason=f"{outcome.exc_type}: {outcome.exc_message}",
        )
        try:
            self.app.publish(
                job.queue,
                message,
                eta=eta if eta > now else None,
                retries=job.retries + 1,
                parent=job.carrier,
            )
        except Exception as exc:
            log.error(
                "cannot publish the retry; the message goes back to the queue",
                task_id=job.task_id,
                error=f"{type(exc).__name__}: {exc}",
            )
            return False
        reason = {
            "exc_type": outcome.exc_type,
            "exc_module": outcome.exc_module,
            "exc_message": outcome.stored_args,
        }
        self._store(job, TaskState.RETRY, reason)
        return True
