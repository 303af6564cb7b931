"""Receive: a broker delivery becomes a `Job` (built by `decode_task`), or is refused with a reason.

Whatever a message can get wrong is found before any task code runs (a bad signature, a body that
does not decode, an unknown task, arguments the function cannot take, too many deliveries: a poison
that keeps killing its worker, canvas fields without the canvas plugin) and dead-lettered with a
reason and one log line, never retried nor dropped silently; no decoder bug takes the worker down.
A message whose eta is ahead goes back to the broker to hold (delays live in the broker, never in
worker memory); one that expired before it arrived is answered REVOKED.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from millpond.consume.settle import Settler, ids, redelivered
from millpond.contracts.backend import ResultMeta
from millpond.contracts.broker import Delivery
from millpond.contracts.canvas import MISSING, Canvas
from millpond.contracts.pool import Capabilities, Job, Outcome
from millpond.exceptions import MalformedMessage, MessageError, MillpondError, UnknownTask
from millpond.states import READY_STATES
from millpond.wire.protocol import decode_task
from millpond.wire.signing import verify

if TYPE_CHECKING:
    from millpond.produce.task import Task

log = structlog.get_logger("millpond.worker")
_PLAIN = inspect.Parameter.POSITIONAL_OR_KEYWORD

#: a component's `discard`: why a task must not run (revoked), or None
Discard = Callable[[str, Mapping[str, Any]], str | None]


class Receiver:
    """Decodes and validates deliveries for one worker, settling what it refuses or finds done
    through the worker's `settler`. `revoked` says why a task must not run (it is answered, never
    held back); `defer_early_ack` names the tasks whose early ack waits until they start (a rate
    limit may hand them back meanwhile)."""

    def __init__(
        self,
        settler: Settler,
        pool_name: str,
        capabilities: Capabilities,
        *,
        revoked: Discard | None = None,
        defer_early_ack: Callable[[str], bool] | None = None,
    ) -> None:
        self.app, self.settings, self.acks = settler.app, settler.settings, settler.acks
        self.settler, self.pool_name, self.capabilities = settler, pool_name, capabilities
        self.revoked, self.defer_early_ack = revoked, defer_early_ack
        self._accept = frozenset(self.settings.accept_content)
        #: task name -> (its signature, (fewest, most) positional arguments if all are plain)
        self._signatures: dict[str, tuple[inspect.Signature | None, tuple[int, int] | None]] = {}
        self._warned: set[tuple[str, str]] = set()
        #: no canvas plugin: a message with canvas fields would fail its canvas step and go back
        #: to the queue on every delivery
        self._no_canvas = type(settler.canvas) is Canvas

    def receive(self, delivery: Delivery) -> Job | None:
        """The job to run (the worker answers a revoked or expired one without running it), or
        None when the delivery was settled here (dead-lettered, acknowledged as already done, or
        handed back to wait for its eta). Never raises."""
        acks, settings = self.acks, self.settings
        acks.held += 1
        try:
            if settings.signing_key:
                verify(delivery.message, settings.signing_key)
            job = decode_task(
                delivery.message, accept=self._accept, max_size=settings.max_message_size
            )
            task = self.app.tasks.get(job.task_name)
            if task is None:
                raise UnknownTask(
                    f"unknown task {job.task_name!r}: not registered in app {self.app.name!r} "
                    f"(registered: {', '.join(sorted(self.app.tasks)) or 'none'}); "
                    "deploy a worker that has it, then replay the dead letters"
                )
            self._check_arguments(task, job)
            if self._no_canvas and job.embed:
                raise MessageError(
                    f"task {job.task_name!r} carries canvas fields ({', '.join(job.embed)}): "
                    f"{MISSING}; then replay the dead letters"
                )
            if delivery.delivery_count > (cap := self.settler.option(task, "max_deliveries")):
                raise MessageError(
                    f"delivered {delivery.delivery_count} times, over max_deliveries={cap}: "
                    "the task keeps being lost (it may kill its worker)"
                )
        except Exception as exc:
            reason = str(exc)
            if not isinstance(exc, MessageError):
                # A decoder bug must not take the worker down: the message would come back and
                # take down every worker after it, before the redelivery cap is even checked.
                log.exception("unexpected error while decoding a message", queue=delivery.queue)
                reason = (
                    f"the message could not be decoded ({type(exc).__name__}: {reason[:200]}); "
                    "this is a bug in millpond, please report it with the dead letter"
                )
            acks.dead_letter(delivery, reason, delivery.message)
            return None
        job.queue, job.delivery = delivery.queue, delivery
        job.delivery_count = delivery.delivery_count
        self._time_limits(task, job)
        if redelivered(job) and (finished := self._finished(job)) is not None:
            if job.embed and job.embed.get("chord"):
                self.settler.rejoin(job, finished)  # its worker may have died before it did
            acks.ack_later([delivery])
            return None
        now = time.time()
        if job.eta is not None and job.eta > now + 0.05 and not self._revoked(job):
            # not due (a producer that does not use broker delays): back to the broker to hold
            try:
                self.app.broker.publish(delivery.queue, delivery.message, eta=job.eta)
            except Exception as exc:
                # the broker is away (publish already retried) or refuses this eta
                acks.dead_letter(
                    delivery,
                    f"could not hand the message back to the broker to hold until its eta "
                    f"({type(exc).__name__}: {str(exc)[:200]}); replay it when the broker is well",
                    job,
                )
            else:
                acks.ack_later([delivery])
            return None
        expired = job.expires is not None and now > job.expires  # answered, and acked, with it
        if not expired and self.acks_early(task, receiving=True):
            acks.ack_now([delivery])  # at-most-once: acknowledged before it runs
            job.delivery = None
        return job

    def acks_early(self, task: Task[..., Any] | None, *, receiving: bool = False) -> bool:
        """Whether the task's message is acknowledged before it runs (acks_late off): as it is
        received, unless a component may hold it back (a rate limit), else as it starts."""
        if self.settler.option(task, "acks_late"):
            return False
        hold = self.defer_early_ack
        return not (receiving and hold is not None and task is not None and hold(task.name))

    def _revoked(self, job: Job) -> bool:
        """Asked only of a job not due yet: a revoked one is answered now, not handed back to
        wait for its eta (the worker asks every job as it receives and as it starts it)."""
        return self.revoked is not None and self.revoked(job.task_id, job.headers) is not None

    def _finished(self, job: Job) -> ResultMeta | None:
        """The final result of a redelivered task, if stored: it ran to the end and its worker
        died before the ack reached the broker (one read per redelivery, none otherwise)."""
        backend = self.app.backend
        if backend is None or backend.replies_to_caller:
            return None  # rpc://: the result went to the caller; nothing here can tell
        try:
            meta = backend.peek(job.task_id)
        except Exception:
            return None  # cannot tell: run it (at least once)
        if meta is None or meta.status not in READY_STATES:
            return None
        log.warning(
            "redelivered message of a task that already finished; acknowledged without "
            "running it again",
            **ids(job),
            state=meta.status,
        )
        return meta

    def check_time_limits(self) -> None:
        """At start-up: the limits the tasks' options and the settings set that the pool cannot
        enforce, an error with `unsupported_options = error`, else one warning."""
        settings = self.settings
        problems = [
            f"{task.name}: {option}={limit:g}s"
            for task in self.app.tasks.values()
            for option, limit in self._unenforced(
                task.options.time_limit or settings.time_limit,
                task.options.soft_time_limit or settings.soft_time_limit,
            )
        ]
        if not problems:
            return
        message = (
            f"the {self.pool_name} pool cannot enforce: {'; '.join(problems)}. "
            "Use a pool that can (prefork enforces both), or drop the option"
        )
        if settings.unsupported_options == "error":
            raise MillpondError(message + " (unsupported_options = error)")
        log.warning(message + "; these tasks will run without that limit")

    def _time_limits(self, task: Task[..., Any], job: Job) -> None:
        """The limits the task's options and the settings give a message that sets none; one
        the pool cannot enforce is told once per task and option."""
        opts, settings = task.options, self.settings
        job.time_limit = job.time_limit or opts.time_limit or settings.time_limit
        job.soft_time_limit = (
            job.soft_time_limit or opts.soft_time_limit or settings.soft_time_limit
        )
        for option, _ in self._unenforced(job.time_limit, job.soft_time_limit):
            if (task.name, option) not in self._warned:
                self._warned.add((task.name, option))
                log.warning(
                    f"the {self.pool_name} pool cannot enforce {option}; "
                    f"{task.name} runs without it",
                    task_name=task.name,
                )

    def _unenforced(self, hard: float | None, soft: float | None) -> Iterator[tuple[str, float]]:
        if hard and not self.capabilities.hard_time_limit:
            yield "time_limit", hard
        if soft and not self.capabilities.soft_time_limit:
            yield "soft_time_limit", soft

    def _check_arguments(self, task: Task[..., Any], job: Job) -> None:
        """`Signature.bind`, or for plain positional parameters and no keyword arguments a count
        (a tenth of the receive step's time for a no-op)."""
        if (known := self._signatures.get(task.name)) is None:
            known = self._signatures[task.name] = _signature(task)
        sig, span = known
        if sig is None or (not job.kwargs and span and span[0] <= len(job.args) <= span[1]):
            return
        try:
            self_arg = (None,) if task.options.bind else ()  # bind=True: the task comes first
            sig.bind(*self_arg, *job.args, **job.kwargs)
        except TypeError as exc:
            error = TypeError(f"wrong arguments for task {task.name}: {exc}")
            # as on Celery's worker, the caller gets the TypeError as the task's FAILURE, its
            # errbacks run and its chord fails; the message is still dead-lettered, to replay
            self.settler.failed(job, Outcome.of(error), "TypeError")
            raise MalformedMessage(str(error)) from None


def _signature(task: Task[..., Any]) -> tuple[inspect.Signature | None, tuple[int, int] | None]:
    """The task's signature, and how many positional arguments it takes (fewest, most) when its
    parameters are all plain positional-or-keyword ones (else `bind` judges every call)."""
    try:
        sig = inspect.signature(task.fn)
    except (TypeError, ValueError):
        return None, None  # a builtin or C function: nothing to check against
    params = list(sig.parameters.values())
    own = 1 if task.options.bind else 0  # bind=True: the task itself comes first
    if len(params) < own or any(p.kind is not _PLAIN for p in params):
        return sig, None
    required = sum(1 for p in params[own:] if p.default is inspect.Parameter.empty)
    return sig, (required, len(params) - own)
