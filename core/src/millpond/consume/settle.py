"""The last step of a task's trip through the worker: store its outcome, publish its retry, and
settle its message (ack, requeue, or dead-letter).

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


def _redelivered(job: Job) -> bool:
    delivery = job.delivery
    return bool(
        job.delivery_count > 1
        or (delivery is not None and delivery.redelivered)
        or REJOIN in job.headers
    )


class Acks:
    """The deliveries this worker holds unacknowledged, and the acks waiting for the next flush."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        #: deliveries held: buffered, running, or finished with their ack pending
        self.held = 0
        self._pending: list[Delivery] = []
        self._backoff = 0.1

    def received(self) -> None:
        self.held += 1

    def ack_now(self, deliveries: Sequence[Delivery]) -> None:
        self.held -= len(deliveries)
        try:
            self.consumer.ack(deliveries)
        except Exception as exc:  # the broker redelivers what it never saw acknowledged
            self.trouble("ack", exc)

    def ack_later(self, deliveries: Sequence[Delivery]) -> None:
        self.held -= len(deliveries)
        self._pending.extend(deliveries)

    def flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending = []
        try:
            self.consumer.ack(pending)
        except Exception as exc:  # the broker redelivers what it never saw acknowledged
            self.trouble("ack", exc)

    def reject(self, delivery: Delivery, *, requeue: bool, reason: str) -> None:
        """Requeue or dead-letter a delivery (counted as no longer held)."""
        self.held -= 1
        try:
            self.consumer.reject(delivery, requeue=requeue, reason=reason)
        except Exception as exc:
            self.trouble("reject", exc)

    def release(self, deliveries: Sequence[Delivery]) -> int:
        """Give unstarted deliveries back to the broker at once (warm shutdown); how many went."""
        if not deliveries:
            return 0
        self.held -= len(deliveries)
        try:
            self.consumer.release(deliveries)
        except Exception as exc:  # still unacknowledged: they come back when the consumer closes
            self.trouble("release", exc)
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

    # -- broker trouble ---------------------------------------------------------------------------
    @property
    def backoff(self) -> float:
        return self._backoff

    def healthy(self) -> None:
        self._backoff = 0.1

    def trouble(self, operation: str, exc: Exception) -> None:
        log.warning(
            f"broker {operation} failed; retrying (unacknowledged messages are redelivered)",
            error=f"{type(exc).__name__}: {exc}",
            backoff=round(self._backoff, 2),
        )
        self._backoff = min(self._backoff * 2, 5.0)


class Settler:
    """Turns outcomes into stored results, retries and settled messages."""

    def __init__(self, app: Millpond, settings: Settings, acks: Acks) -> None:
        self.app = app
        self.settings = settings
        self.acks = acks
        #: the canvas plugin (millpond.contracts.canvas): called only for tasks with canvas fields
        self.canvas = app.canvas
        self.processed = 0

    def finish(self, job: Job, outcome: Outcome, *, defer_ack: bool = False) -> Delivery | None:
        """Store the outcome and settle the message. Returns the delivery to ack when deferred."""
        self.processed += 1
        state = outcome.state
        delivery: Delivery | None = job.delivery
        if state == TaskState.SUCCESS:
            if not self._succeeded(job, outcome):
                self._canvas_lost(job, delivery)
                return None
        elif state == TaskState.RETRY:
            if not self._publish_retry(job, outcome):
                self._settle(delivery, requeue=True, reason="retry could not be published")
                return None
        elif state == TaskState.REJECTED:
            log.warning(
                "task rejected its message",
                task_id=job.task_id,
                task_name=job.task_name,
                reason=outcome.exc_message,
                requeue=outcome.requeue,
            )
            self._settle(
                delivery,
                requeue=outcome.requeue,
                reason=f"rejected by the task: {outcome.exc_message}",
            )
            return None
        elif state == TaskState.LOST:
            return self._lost(job, outcome, delivery, defer_ack=defer_ack)
        elif state == TaskState.TIMEOUT:
            log.error(
                "task over its hard time limit",
                task_id=job.task_id,
                task_name=job.task_name,
                time_limit=job.time_limit,
            )
            self._store_error(job, outcome, TimeLimitExceeded.__name__)
        elif state == TaskState.REVOKED:
            reason = outcome.exc_message or "revoked"
            error = error_info("TaskRevokedError", "celery.exceptions", [reason])
            self._store(job, TaskState.REVOKED, error)
            if job.embed:
                ok, _ = self._canvas_step(
                    "return its chord part for",
                    lambda: self.canvas.chord_part(job, TaskState.REVOKED, error),
                    job,
                )
                if not ok:
                    self._canvas_lost(job, delivery)
                    return None
        else:  # FAILURE, or anything a third-party pool invents
            log.error(
                "task failed",
                task_id=job.task_id,
                task_name=job.task_name,
                error=f"{outcome.exc_type}: {outcome.exc_message}",
                traceback=outcome.traceback,
            )
            if not self._store_error(job, outcome, outcome.exc_type or "TaskError"):
                self._canvas_lost(job, delivery)
                return None
        return self._acked(delivery, defer_ack)

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

    def _hold_for_claim(self, job: Job, expires: float) -> None:
        """Put the message back to wait, in the broker, until the chord's claim lapses; marked
        so the worker that gets it returns the part again instead of running the task."""
        delivery = job.delivery
        if delivery is None:
            return  # acknowledged before it ran (acks_late off): nothing to hold
        message = delivery.message
        held = Message(
            body=message.body,
            headers={**message.headers, REJOIN: 1},
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            properties=dict(message.properties),
        )
        log.warning(
            "the chord this task completed is claimed by another worker, which may have died; "
            "its message waits for the claim to lapse and returns its part again",
            task_id=job.task_id,
            group_id=job.group_id,
            wait=round(max(0.0, expires - time.time()), 3),
        )
        self.app.broker.publish(job.queue, held, eta=expires + 0.25)

    def _canvas_lost(self, job: Job, delivery: Delivery | None) -> None:
        """A canvas step could not be sent: the message goes back, so the task runs again and the
        canvas goes on (never acknowledged with its next steps lost)."""
        log.error(
            "the task's canvas could not go on; its message goes back to the queue",
            task_id=job.task_id,
            task_name=job.task_name,
        )
        self._settle(delivery, requeue=True, reason="a canvas step could not be sent")

    def _acked(self, delivery: Delivery | None, defer: bool) -> Delivery | None:
        if delivery is None:
            return None
        if defer:
            return delivery
        self.acks.ack_later([delivery])
        return None

    def _lost(
        self, job: Job, outcome: Outcome, delivery: Delivery | None, *, defer_ack: bool
    ) -> Delivery | None:
        """The execution unit died: requeue (counted, capped) or fail, per the task's policy."""
        task = self.app.tasks.get(job.task_name)
        requeue = task is None or task.options.reject_on_worker_lost
        capped = job.delivery_count >= self.settings.max_deliveries
        log.error(
            "task lost its execution unit",
            task_id=job.task_id,
            task_name=job.task_name,
            reason=outcome.exc_message,
            requeue=requeue and not capped,
            delivery_count=job.delivery_count,
        )
        if not (requeue and delivery is not None):
            self._store_error(job, outcome, WorkerLostError.__name__)
            return self._acked(delivery, defer_ack)
        if not capped:
            self._settle(delivery, requeue=True, reason=outcome.exc_message)
            return None
        reason = (
            f"lost {job.delivery_count} times (max_deliveries="
            f"{self.settings.max_deliveries}): {outcome.exc_message}"
        )
        # a final FAILURE too, so a caller waiting on the result is answered
        self._store_error(job, outcome, WorkerLostError.__name__)
        self.acks.dead_letter(delivery, reason, task_id=job.task_id, task_name=job.task_name)
        return None

    def _settle(self, delivery: Delivery | None, *, requeue: bool, reason: str) -> None:
        """Requeue or dead-letter a delivery; nothing is left for `finish` to ack."""
        if delivery is not None:
            self.acks.reject(delivery, requeue=requeue, reason=reason)

    # -- results ----------------------------------------------------------------------------------
    def _ignore_result(self, job: Job) -> bool:
        task = self.app.tasks.get(job.task_name)
        if task is not None and task.options.ignore_result is not None:
            return task.options.ignore_result
        return self.settings.ignore_result

    def _store(
        self,
        job: Job,
        status: TaskState,
        result: Any,
        traceback: str | None = None,
        children: list[Any] | None = None,
    ) -> None:
        if status == TaskState.SUCCESS and self._ignore_result(job):
            return
        backend = self.app.backend
        if backend is None:
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
            backend.store(meta)
        except (TypeError, ValueError) as exc:
            log.error(
                "task result cannot be stored as JSON",
                task_id=job.task_id,
                task_name=job.task_name,
                error=str(exc),
            )
            backend.store(
                ResultMeta(
                    task_id=job.task_id,
                    status=TaskState.FAILURE,
                    name=job.task_name,
                    result={
                        "exc_type": "TypeError",
                        "exc_module": "builtins",
                        "exc_message": [f"result is not JSON serializable: {exc}"],
                    },
                    date_done=meta.date_done,
                    reply_to=job.reply_to,
                )
            )
        except Exception as exc:
            log.error(
                "cannot store task result; the task ran and its message is acknowledged",
                task_id=job.task_id,
                error=f"{type(exc).__name__}: {exc}",
            )

    def _store_error(self, job: Job, outcome: Outcome, exc_type: str) -> bool:
        """Store a failure; then what Celery does after one: the chord's part, the chain's later
        steps, the errbacks. Returns False when a canvas step could not be sent."""
        info = error_info(
            outcome.exc_type or exc_type,
            outcome.exc_module,
            outcome.stored_args,
        )
        self._store(job, TaskState.FAILURE, info, outcome.traceback)
        if not job.embed:
            return True
        ok, _ = self._canvas_step(
            "return its chord part for",
            lambda: self.canvas.chord_part(job, TaskState.FAILURE, info, again=_redelivered(job)),
            job,
        )
        done, _ = self._canvas_step(
            "fail the rest of", lambda: self.canvas.after_failure(job, outcome, info), job
        )
        return ok and done

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
        joined, _ = self._canvas_step(
            "return its chord part for",
            lambda: self.canvas.chord_part(
                job, TaskState.SUCCESS, outcome.result, again=_redelivered(job)
            ),
            job,
        )
        return joined

    def _canvas_step(self, what: str, step: Callable[[], Any], job: Job) -> tuple[bool, Any]:
        """Run a canvas step; one that raises (a broker away past its retries, a backend that
        cannot join) is logged with the task and reported as (False, None)."""
        try:
            return True, step()
        except ClaimedElsewhere as claimed:
            try:
                self._hold_for_claim(job, claimed.expires)
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
        headers: dict[str, Any] = {}
        embed = job.embed or {}
        if "ignore_result" in job.headers:
            headers["ignore_result"] = job.headers["ignore_result"]
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
        self._store(
            job,
            TaskState.RETRY,
            {
                "exc_type": outcome.exc_type,
                "exc_module": outcome.exc_module,
                "exc_message": outcome.stored_args,
            },
        )
        return True
