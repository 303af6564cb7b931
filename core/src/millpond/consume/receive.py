"""The first step of a task's trip through the worker: a broker delivery becomes a `Job` (the one
object `decode_task` builds, which the pool runs and the settler settles), or is refused with a
reason.

Everything a message can get wrong is found here, before any task code runs: a bad signature, a
body that does not decode, an unknown task, arguments the function cannot take, too many
deliveries (a poison message that keeps killing its worker), canvas fields (callbacks, errbacks,
chain, chord) on a worker without the canvas plugin. Each is dead-lettered with a reason
and one log line; none is retried, none is dropped silently, and no bug in the decoder can take
the worker down. A message whose eta is still ahead goes back to the broker to hold (delays live in
the broker, never in worker memory); one that expired before it arrived is answered REVOKED.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from millpond.consume.settle import Acks, redelivered
from millpond.contracts.backend import ResultMeta
from millpond.contracts.broker import Delivery
from millpond.contracts.canvas import MISSING, Canvas
from millpond.contracts.pool import Capabilities, Job
from millpond.exceptions import MalformedMessage, MessageError, UnknownTask
from millpond.states import READY_STATES
from millpond.wire.protocol import decode_task
from millpond.wire.signing import verify

if TYPE_CHECKING:
    from millpond.config.settings import Settings
    from millpond.produce.app import Millpond
    from millpond.produce.task import Task

log = structlog.get_logger("millpond.worker")
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class Receiver:
    """Decodes and validates deliveries for one worker."""

    def __init__(
        self,
        app: Millpond,
        settings: Settings,
        acks: Acks,
        pool_name: str,
        capabilities: Capabilities,
        *,
        rejoin: Callable[[Job, ResultMeta], None] | None = None,
        revoked: Callable[[str, Mapping[str, Any]], str | None] | None = None,
        defer_early_ack: Callable[[str], bool] | None = None,
    ) -> None:
        self.app = app
        #: tasks whose early ack waits until they start (rate-limited ones wait for a token, and
        #: may go back to the broker meanwhile)
        self.defer_early_ack = defer_early_ack
        #: what finishes a redelivered task that already ran (its chord part)
        self.rejoin = rejoin
        #: why a task is revoked (None: it is not); a revoked task is answered, never held back
        self.revoked = revoked
        self.settings = settings
        self.acks = acks
        self.pool_name = pool_name
        self.capabilities = capabilities
        self._accept = frozenset(settings.accept_content)
        self._signatures: dict[str, inspect.Signature | None] = {}
        #: task name -> (fewest, most) positional arguments, for plain signatures only
        self._positional: dict[str, tuple[int, int]] = {}
        self._warned: set[tuple[str, str]] = set()
        #: no canvas plugin (the core's stand-in): a message with canvas fields can never finish
        #: here, and would run, fail its canvas step and go back to the queue on every delivery
        self._no_canvas = type(app.canvas) is Canvas

    def receive(self, delivery: Delivery) -> Job | None:
        """The job to run (the worker answers one that is revoked or expired without running
        it), or None when the delivery was settled here (dead-lettered, acknowledged as already
        done, or handed back to wait for its eta). Never raises."""
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
                fields = ", ".join(job.embed)
                raise MessageError(
                    f"task {job.task_name!r} carries canvas fields ({fields}): {MISSING}; "
                    "then replay the dead letters"
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
            message = delivery.message
            acks.dead_letter(delivery, reason, task_id=message.task_id, task_name=message.task_name)
            return None
        self._add_delivery(task, job, delivery)
        if delivery.delivery_count > settings.max_deliveries:
            acks.dead_letter(
                delivery,
                f"delivered {delivery.delivery_count} times, over max_deliveries="
                f"{settings.max_deliveries}: the task keeps being lost (it may kill its worker)",
                task_id=job.task_id,
                task_name=job.task_name,
            )
            return None
        if redelivered(job):
            finished = self._finished(job)
            if finished is not None:
                if self.rejoin is not None and job.embed and job.embed.get("chord"):
                    # the worker may have died between storing the result and returning the
                    # chord's part: return it again (a part counts once)
                    self.rejoin(job, finished)
                acks.ack_later([delivery])
                return None
        now = time.time()
        if self.revoked is not None and self.revoked(job.task_id, job.headers) is not None:
            return job  # answered REVOKED by the worker
        if job.eta is not None and job.eta > now + 0.05:
            self._hand_back(delivery, job)
            return None
        if job.expires is not None and now > job.expires:
            return job  # answered REVOKED by the worker; acked with it
        if self.acks_early(task, receiving=True):
            acks.ack_now([delivery])  # at-most-once: acknowledged before it runs
            job.delivery = None
        return job

    def acks_early(self, task: Task[..., Any] | None, *, receiving: bool = False) -> bool:
        """Whether the task's message is acknowledged before it runs (acks_late off): as it is
        received, unless a component may hold it back (a rate limit), else as it starts."""
        late = task.options.acks_late if task is not None else None
        if late if late is not None else self.settings.acks_late:
            return False
        hold = self.defer_early_ack
        return not (receiving and hold is not None and task is not None and hold(task.name))

    def _finished(self, job: Job) -> ResultMeta | None:
        """The final result of a redelivered message's task, if one is stored: it ran to the end
        and its worker died before the ack reached the broker. It is acknowledged without running
        again (only redeliveries are checked: one read each, none otherwise)."""
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
            task_id=job.task_id,
            task_name=job.task_name,
            state=meta.status,
        )
        return meta

    def _hand_back(self, delivery: Delivery, job: Job) -> None:
        """Not due yet (a producer that does not use broker delays): back to the broker to hold,
        never into this worker's memory."""
        try:
            self.app.broker.publish(delivery.queue, delivery.message, eta=job.eta)
        except Exception as exc:
            # the broker is away (publish already retried) or refuses this eta: the message goes
            # to the dead letters with the reason, or back to the queue if even that fails
            self.acks.dead_letter(
                delivery,
                f"could not hand the message back to the broker to hold until its eta "
                f"({type(exc).__name__}: {str(exc)[:200]}); replay it when the broker is well",
                task_id=job.task_id,
                task_name=job.task_name,
            )
            return
        self.acks.ack_later([delivery])

    def _add_delivery(self, task: Task[..., Any], job: Job, delivery: Delivery) -> None:
        """What the decoded message does not say: where it came from, and the time limits the
        task's options and the settings give it when the message sets none."""
        opts, settings = task.options, self.settings
        job.time_limit = hard = job.time_limit or opts.time_limit or settings.time_limit
        job.soft_time_limit = soft = (
            job.soft_time_limit or opts.soft_time_limit or settings.soft_time_limit
        )
        if hard and not self.capabilities.hard_time_limit:
            self._unsupported(task.name, "time_limit")
        if soft and not self.capabilities.soft_time_limit:
            self._unsupported(task.name, "soft_time_limit")
        job.queue, job.delivery_count, job.delivery = (
            delivery.queue,
            delivery.delivery_count,
            delivery,
        )

    def _unsupported(self, task_name: str, option: str) -> None:
        key = (task_name, option)
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning(
            f"the {self.pool_name} pool cannot enforce {option}; {task_name} runs without it",
            task_name=task_name,
        )

    def _check_arguments(self, task: Task[..., Any], job: Job) -> None:
        name = task.name
        if name not in self._signatures:
            self._learn_signature(task)
        if not job.kwargs:
            span = self._positional.get(name)
            # plain positional parameters: a count is the whole check
            if span is not None and span[0] <= len(job.args) <= span[1]:
                return
        sig = self._signatures[name]
        if sig is None:
            return
        try:
            if task.options.bind:
                sig.bind(None, *job.args, **job.kwargs)
            else:
                sig.bind(*job.args, **job.kwargs)
        except TypeError as exc:
            raise MalformedMessage(f"wrong arguments for task {name}: {exc}") from None

    def _learn_signature(self, task: Task[..., Any]) -> None:
        """The task's signature, once; and when its parameters are all plain positional-or-
        keyword ones, how many positional arguments it takes (fewest, most), so a call without
        keyword arguments is checked by a count instead of `Signature.bind` (a tenth of the
        receive step's time for a no-op)."""
        try:
            sig: inspect.Signature | None = inspect.signature(task.fn)
        except (TypeError, ValueError):
            sig = None  # a builtin or C function: nothing to check against
        self._signatures[task.name] = sig
        if sig is None:
            return
        params = list(sig.parameters.values())
        if task.options.bind:
            if not params or params[0].kind not in _POSITIONAL:
                return  # nowhere for the task itself to go: bind says so, every call
            params = params[1:]
        if all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
            required = sum(1 for p in params if p.default is inspect.Parameter.empty)
            self._positional[task.name] = (required, len(params))
