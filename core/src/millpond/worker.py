"""The worker: one consumer loop that owns all broker I/O, and a pool that runs the jobs.

The loop fetches at most `prefetch` unacknowledged messages, decodes and validates each, and keeps
the resulting jobs in its own buffer. It hands a job to the pool only when the pool has a free slot,
so no pool ever queues work behind a long task (no head-of-line blocking), and a warm shutdown
leaves the jobs that never started unacknowledged: they go back to the broker when the consumer
closes. Completions come back through an `Inbox` whose waker interrupts the broker wait at once;
the loop then stores results, publishes retries and acknowledges, in batches.

Signals: SIGTERM and the first Ctrl-C start a warm shutdown (stop fetching, finish running tasks,
ack them, exit 0, turning cold after `shutdown_timeout`); a second Ctrl-C or SIGQUIT is a cold
shutdown (running tasks are abandoned and their messages go back to the broker).
"""

from __future__ import annotations

import inspect
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog

from millpond import execution, metrics, observability, plugins, telemetry
from millpond.broker import (
    FAILURE,
    RETRY,
    REVOKED,
    SUCCESS,
    Consumer,
    Delivery,
    Inbox,
    ResultMeta,
    mask_url,
)
from millpond.exceptions import (
    MessageError,
    MillpondError,
    TimeLimitExceeded,
    UnknownTask,
    WorkerLostError,
)
from millpond.pool import LOST, REJECTED, TIMEOUT, BasePool, Job, Outcome
from millpond.pool import RETRY as OUT_RETRY
from millpond.pool import REVOKED as OUT_REVOKED
from millpond.pool import SUCCESS as OUT_SUCCESS
from millpond.protocol import PICKLE, TaskMessage, decode_task, encode_task
from millpond.settings import Settings, load_settings
from millpond.signing import sign as sign_message
from millpond.signing import verify as verify_signature

if TYPE_CHECKING:
    from millpond.app import Millpond
    from millpond.task import Task

log = structlog.get_logger("millpond.worker")

#: worker exit codes
EXIT_OK = 0
EXIT_COLD = 1
EXIT_ERROR = 2


def _in_main_thread() -> bool:
    """Whether this is the main thread: only it may install signal handlers.

    Under eventlet's monkey-patching the main greenthread's `current_thread()` is a new
    `_MainThread` object, not `threading.main_thread()`, so an identity check alone would leave an
    eventlet worker without its SIGTERM handler (killed outright instead of a warm shutdown).
    """
    current, main = threading.current_thread(), threading.main_thread()
    if current is main:
        return True
    return current.name == main.name and type(current).__name__ == type(main).__name__


class Worker:
    """Runs an app's tasks from the broker until told to stop. `run()` blocks; `stop()` is thread-safe."""

    def __init__(self, app: Millpond, *, settings: Settings | None = None, **flags: Any) -> None:
        self.app = app
        if settings is None:
            settings = load_settings(flags, code=app.code_config)
        elif flags:
            settings = settings.replace(**{k: v for k, v in flags.items() if v is not None})
        self.settings = settings
        app.configure(settings)
        self.pool_cls: type[BasePool] = plugins.pool_class(settings.pool)
        self.concurrency = settings.concurrency or self.pool_cls.default_concurrency()
        multiplier = settings.prefetch_multiplier
        if settings.sources.get("prefetch_multiplier", "default") == "default":
            multiplier = self.pool_cls.default_prefetch_multiplier or multiplier
        self.prefetch = max(1, self.concurrency * multiplier)
        self.queues = tuple(settings.queues)
        self.name = settings.worker_name or f"{os.getpid()}@{socket.gethostname()}"
        self.inbox: Inbox[tuple[Job, Outcome]] = Inbox()
        self.ready = threading.Event()
        self.pool: BasePool | None = None
        self.consumer: Consumer | None = None
        self._buffer: deque[Job] = deque()
        self._unacked = 0  # deliveries held: buffered + running
        self._stop = threading.Event()
        self._cold = False
        self._stop_deadline: float | None = None
        self._accept = frozenset(settings.accept_content)
        self._signatures: dict[str, inspect.Signature | None] = {}
        self._warned: set[tuple[str, str]] = set()
        self._inline = False
        self._backoff = 0.1
        self._pending_acks: list[Delivery] = []
        self.processed = 0
        #: monotonic time of the consumer loop's last iteration (read by the /livez probe)
        self.last_turn = 0.0

    # -- control ---------------------------------------------------------------------------------
    def stop(self, cold: bool = False) -> None:
        """Ask the worker to shut down (warm by default); safe from any thread."""
        if cold:
            self._cold = True
        if not self._stop.is_set():
            self._stop.set()
            self._stop_deadline = time.monotonic() + self.settings.shutdown_timeout
        self.inbox.waker.wake()

    def _install_signals(self) -> None:
        if not _in_main_thread():
            return

        def warm(signum: int, _frame: FrameType | None) -> None:
            if self._stop.is_set() and signum == signal.SIGINT:
                cold(signum, _frame)
                return
            log.info(
                "warm shutdown requested",
                signal=signal.Signals(signum).name,
                running=self._running(),
            )
            self.stop()

        def cold(signum: int, _frame: FrameType | None) -> None:
            log.warning("cold shutdown requested", signal=signal.Signals(signum).name)
            self.stop(cold=True)
            if self._inline:  # the solo pool runs the task in this thread: interrupt it
                raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, warm)
        signal.signal(signal.SIGINT, warm)
        if hasattr(signal, "SIGQUIT"):
            signal.signal(signal.SIGQUIT, cold)

    def _running(self) -> int:
        return self.pool.active if self.pool else 0

    # -- start-up --------------------------------------------------------------------------------
    def banner(self) -> str:
        tasks = sorted(self.app.tasks)
        lines = [
            f"millpond {plugins.core_version()} worker {self.name}",
            f"  app:         {self.app.name}",
            f"  broker:      {mask_url(self.app.broker_url)}",
            f"  results:     {mask_url(self.settings.result_backend) or '(kept by the broker)'}",
            f"  pool:        {self.settings.pool} (concurrency {self.concurrency}, "
            f"prefetch {self.prefetch})",
            f"  queues:      {', '.join(self.queues)}",
            f"  tasks ({len(tasks)}):",
            *(f"    . {name}" for name in tasks),
        ]
        return "\n".join(lines)

    def _check_capabilities(self) -> None:
        caps = self.pool_cls.capabilities
        problems: list[str] = []
        for task in self.app.tasks.values():
            hard = task.options.time_limit or self.settings.time_limit
            soft = task.options.soft_time_limit or self.settings.soft_time_limit
            if hard and not caps.hard_time_limit:
                problems.append(f"{task.name}: time_limit={hard:g}s")
            if soft and not caps.soft_time_limit:
                problems.append(f"{task.name}: soft_time_limit={soft:g}s")
        if not problems:
            return
        message = (
            f"the {self.settings.pool} pool cannot enforce: {'; '.join(problems)}. "
            "Use a pool that can (prefork enforces both), or drop the option"
        )
        if self.settings.unsupported_options == "error":
            raise MillpondError(message + " (unsupported_options = error)")
        log.warning(message + "; these tasks will run without that limit")

    def run(self) -> int:
        """Run until stopped; returns the exit code (0 after a warm shutdown)."""
        if not structlog.is_configured():
            from millpond import logs

            logs.configure(
                self.settings.log_level, self.settings.log_format, stdlib=self.settings.log_stdlib
            )
        if PICKLE in self._accept:
            log.warning(
                "accept_content allows pickle: any producer that can reach the broker can "
                "run code in this worker; allow it only if every producer is trusted"
            )
        execution.set_worker_app(self.app)
        telemetry.refresh(parenting="link" if self.settings.trace_link else "parent")
        self._check_capabilities()
        broker = self.app.broker
        telemetry.refresh(system=broker.system)
        broker.connect()
        broker.declare(self.queues)
        _ = self.app.backend  # resolve it now: a bad backend URL fails at start-up
        pool_options = self._pool_options()
        self.pool = self.pool_cls(self.concurrency, self._on_complete, pool_options)
        self._install_signals()
        self.pool.start()  # prefork forks here: after the app import, before consumer threads
        self.consumer = broker.consumer(self.queues, self.prefetch)
        code = EXIT_OK
        try:
            observability.worker_started(self)  # metrics, probes: after the pool forked
            self.ready.set()
            log.info(
                "worker ready",
                worker=self.name,
                pool=self.settings.pool,
                concurrency=self.concurrency,
                queues=list(self.queues),
            )
            self._loop()
        except KeyboardInterrupt:
            self._cold = True
        finally:
            code = self._shutdown()
        return code

    def _pool_options(self) -> dict[str, Any]:
        declared = getattr(self.pool_cls, "settings", None)
        if declared is not None:
            return dict(self.settings.section(declared))
        return dict(self.settings.sections.get(self.settings.pool, {}))

    # -- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        assert self.consumer is not None
        assert self.pool is not None
        consumer, pool, inbox = self.consumer, self.pool, self.inbox
        waker = inbox.waker
        while True:
            self.last_turn = time.monotonic()
            if len(inbox):
                self._complete_batch()
            if self._stop.is_set():
                if self._cold or not self._running():
                    return
                if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
                    log.warning(
                        "warm shutdown timed out; going cold",
                        timeout=self.settings.shutdown_timeout,
                        running=self._running(),
                    )
                    self._cold = True
                    return
            else:
                self._dispatch_buffered(pool)
                room = self.prefetch - self._unacked
                if room > 0:
                    self._flush_acks()
                    try:
                        deliveries = consumer.fetch(room, 1.0, waker)
                    except Exception as exc:
                        # Brokers reconnect inside fetch; one that raises instead must not take
                        # the worker down: what it held unacknowledged comes back (at-least-once).
                        self._broker_trouble("fetch", exc)
                        waker.wait(self._backoff)
                        continue
                    self._backoff = 0.1
                    if deliveries:
                        for delivery in deliveries:
                            self._receive(delivery)
                        self._dispatch_buffered(pool)
                    continue
            if waker.is_set and not len(inbox):
                # stop()'s wake-up, already acted on: clear it, or this wait returns at once and
                # the loop spins (starving a green pool's tasks, so a warm stop never finishes)
                waker.clear()
                if len(inbox):
                    continue
            self._flush_acks()
            waker.wait(0.5)

    def _dispatch_buffered(self, pool: BasePool) -> None:
        buffer = self._buffer
        while buffer and pool.active < pool.concurrency and not self._stop.is_set():
            job = buffer.popleft()
            if job.expires is not None and time.time() > job.expires:
                self._finish(
                    job,
                    Outcome.error(OUT_REVOKED, "TaskRevokedError", "expired before it could start"),
                )
                continue
            job.started = time.monotonic()
            if metrics.ENABLED:
                metrics.started(job, time.time())
            if not pool.capabilities.concurrent:
                self._inline = True
                try:
                    pool.apply_async(job)
                finally:
                    self._inline = False
                if len(self.inbox):
                    self._complete_batch()
            else:
                pool.apply_async(job)

    def _receive(self, delivery: Delivery) -> None:
        """Turn a delivery into a buffered job, or reject it with a reason; never raises."""
        assert self.consumer is not None
        self._unacked += 1
        settings = self.settings
        try:
            if settings.signing_key:
                verify_signature(delivery.message, settings.signing_key)
            msg = decode_task(
                delivery.message, accept=self._accept, max_size=settings.max_message_size
            )
            task = self.app.tasks.get(msg.task)
            if task is None:
                raise UnknownTask(
                    f"unknown task {msg.task!r}: not registered in app {self.app.name!r} "
                    f"(registered: {', '.join(sorted(self.app.tasks)) or 'none'}); "
                    "deploy a worker that has it, then replay the dead letters"
                )
            self._check_arguments(task, msg)
        except MessageError as exc:
            self._dead_letter(
                delivery,
                str(exc),
                task_id=delivery.message.task_id,
                task_name=delivery.message.task_name,
            )
            return
        except Exception as exc:
            # A decoder bug must not take the worker down: the message would come back and take
            # down every worker after it, before the redelivery cap is even checked.
            log.exception("unexpected error while decoding a message", queue=delivery.queue)
            self._dead_letter(
                delivery,
                f"the message could not be decoded ({type(exc).__name__}: {str(exc)[:200]}); "
                "this is a bug in millpond, please report it with the dead letter",
                task_id=delivery.message.task_id,
                task_name=delivery.message.task_name,
            )
            return
        if delivery.delivery_count > settings.max_deliveries:
            self._dead_letter(
                delivery,
                f"delivered {delivery.delivery_count} times, over max_deliveries="
                f"{settings.max_deliveries}: the task keeps being lost (it may kill its worker)",
                task_id=msg.id,
                task_name=msg.task,
            )
            return
        now = time.time()
        if msg.eta is not None and msg.eta > now + 0.05:
            # Not due yet (a producer that does not use broker delays): hand it back to the broker
            # to hold, never to this worker's memory.
            try:
                self.app.broker.publish(delivery.queue, delivery.message, eta=msg.eta)
            except Exception as exc:
                # the broker is away (publish already retried) or refuses this eta: the message
                # goes to the dead letters with the reason, or back to the queue if even that fails
                self._dead_letter(
                    delivery,
                    f"could not hand the message back to the broker to hold until its eta "
                    f"({type(exc).__name__}: {str(exc)[:200]}); replay it when the broker is well",
                    task_id=msg.id,
                    task_name=msg.task,
                )
                return
            self._ack_later([delivery])
            return
        job = self._make_job(task, msg, delivery)
        if metrics.ENABLED:
            metrics.received(job)
        if msg.expires is not None and now > msg.expires:
            self._finish(
                job,
                Outcome.error(
                    OUT_REVOKED, "TaskRevokedError", "expired before a worker received it"
                ),
            )
            return
        if not (
            task.options.acks_late if task.options.acks_late is not None else settings.acks_late
        ):
            self._ack([delivery])  # at-most-once: acknowledged before it runs
            job.delivery = None
        self._buffer.append(job)

    def _make_job(self, task: Task, msg: TaskMessage, delivery: Delivery) -> Job:
        opts, settings = task.options, self.settings
        hard = msg.time_limit or opts.time_limit or settings.time_limit
        soft = msg.soft_time_limit or opts.soft_time_limit or settings.soft_time_limit
        caps = self.pool_cls.capabilities
        if hard and not caps.hard_time_limit:
            self._unsupported(task.name, "time_limit")
        if soft and not caps.soft_time_limit:
            self._unsupported(task.name, "soft_time_limit")
        return Job(
            task_id=msg.id,
            task_name=msg.task,
            args=msg.args,
            kwargs=msg.kwargs,
            retries=msg.retries,
            queue=delivery.queue,
            time_limit=hard,
            soft_time_limit=soft,
            root_id=msg.root_id,
            parent_id=msg.parent_id,
            origin=msg.origin,
            eta=msg.eta,
            expires=msg.expires,
            producer_traceparent=msg.traceparent,
            producer_tracestate=msg.tracestate,
            delivery_count=delivery.delivery_count,
            sent_at=msg.sent_at,
            delivery=delivery,
        )

    def _unsupported(self, task_name: str, option: str) -> None:
        key = (task_name, option)
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning(
            f"the {self.settings.pool} pool cannot enforce {option}; {task_name} runs without it",
            task_name=task_name,
        )

    def _check_arguments(self, task: Task, msg: TaskMessage) -> None:
        if task.name in self._signatures:
            sig = self._signatures[task.name]
        else:
            try:
                sig = inspect.signature(task.fn)
            except (TypeError, ValueError):
                sig = None  # a builtin or C function: nothing to check against
            self._signatures[task.name] = sig
        if sig is None:
            return
        try:
            if task.options.bind:
                sig.bind(None, *msg.args, **msg.kwargs)
            else:
                sig.bind(*msg.args, **msg.kwargs)
        except TypeError as exc:
            from millpond.exceptions import MalformedMessage

            raise MalformedMessage(f"wrong arguments for task {task.name}: {exc}") from None

    def _dead_letter(
        self, delivery: Delivery, reason: str, *, task_id: str | None, task_name: str | None
    ) -> None:
        assert self.consumer is not None
        log.error(
            "message rejected to the dead-letter queue",
            reason=reason,
            task_id=task_id,
            task_name=task_name,
            queue=delivery.queue,
        )
        try:
            self.consumer.reject(delivery, requeue=False, reason=reason)
        except Exception as exc:
            self._broker_trouble("dead-letter", exc)
        finally:
            self._unacked -= 1

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        assert self.consumer is not None
        self._unacked -= len(deliveries)
        try:
            self.consumer.ack(deliveries)
        except Exception as exc:  # the broker redelivers what it never saw acknowledged
            self._broker_trouble("ack", exc)

    def _broker_trouble(self, operation: str, exc: Exception) -> None:
        log.warning(
            f"broker {operation} failed; retrying (unacknowledged messages are redelivered)",
            error=f"{type(exc).__name__}: {exc}",
            backoff=round(self._backoff, 2),
        )
        self._backoff = min(self._backoff * 2, 5.0)

    # -- completions -----------------------------------------------------------------------------
    def _on_complete(self, job: Job, outcome: Outcome) -> None:
        """Called by the pool, from any thread: hand over to the loop."""
        if self._inline:  # the solo pool, in the loop's own thread: no wake-up needed
            self.inbox.put_quiet((job, outcome))
        else:
            self.inbox.put((job, outcome))

    def _complete_batch(self) -> None:
        acks: list[Delivery] = []
        for job, outcome in self.inbox.drain():
            action = self._finish(job, outcome, defer_ack=True)
            if action is not None:
                acks.append(action)
        if acks:
            self._ack_later(acks)

    def _ack_later(self, deliveries: Sequence[Delivery]) -> None:
        """Queue acks for the next flush: the loop flushes before it waits on or fetches from the
        broker, so a burst of completions (the solo pool's whole prefetch window) costs one round
        trip instead of one each, and no ack waits on anything but the current turn of the loop."""
        self._unacked -= len(deliveries)
        self._pending_acks.extend(deliveries)

    def _flush_acks(self) -> None:
        pending = self._pending_acks
        if not pending:
            return
        self._pending_acks = []
        assert self.consumer is not None
        try:
            self.consumer.ack(pending)
        except Exception as exc:  # the broker redelivers what it never saw acknowledged
            self._broker_trouble("ack", exc)

    def _finish(self, job: Job, outcome: Outcome, *, defer_ack: bool = False) -> Delivery | None:
        """Store the outcome and settle the message. Returns the delivery to ack when deferred."""
        self.processed += 1
        if metrics.ENABLED:
            metrics.finished(job, outcome)
        state = outcome.state
        delivery: Delivery | None = job.delivery
        task = self.app.tasks.get(job.task_name)
        if state == OUT_SUCCESS:
            self._store(job, SUCCESS, outcome.result)
        elif state == OUT_RETRY:
            if not self._publish_retry(job, outcome):
                return self._settle(delivery, requeue=True, reason="retry could not be published")
        elif state == REJECTED:
            log.warning(
                "task rejected its message",
                task_id=job.task_id,
                task_name=job.task_name,
                reason=outcome.exc_message,
                requeue=outcome.requeue,
            )
            return self._settle(
                delivery,
                requeue=outcome.requeue,
                reason=f"rejected by the task: {outcome.exc_message}",
            )
        elif state == LOST:
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
            if requeue and delivery is not None:
                if capped:
                    reason = (
                        f"lost {job.delivery_count} times (max_deliveries="
                        f"{self.settings.max_deliveries}): {outcome.exc_message}"
                    )
                    # the same line as every other dead-lettering, so one search finds them all;
                    # and a final FAILURE, so a caller waiting on the result is answered
                    log.error(
                        "message rejected to the dead-letter queue",
                        reason=reason,
                        task_id=job.task_id,
                        task_name=job.task_name,
                        queue=delivery.queue,
                    )
                    self._store_error(job, outcome, WorkerLostError.__name__)
                    return self._settle(delivery, requeue=False, reason=reason)
                return self._settle(delivery, requeue=True, reason=outcome.exc_message)
            self._store_error(job, outcome, WorkerLostError.__name__)
        elif state == TIMEOUT:
            log.error(
                "task over its hard time limit",
                task_id=job.task_id,
                task_name=job.task_name,
                time_limit=job.time_limit,
            )
            self._store_error(job, outcome, TimeLimitExceeded.__name__)
        elif state == OUT_REVOKED:
            self._store(job, REVOKED, outcome.exc_message or "revoked")
        else:  # FAILURE, or anything a third-party pool invents
            log.error(
                "task failed",
                task_id=job.task_id,
                task_name=job.task_name,
                error=f"{outcome.exc_type}: {outcome.exc_message}",
                traceback=outcome.traceback,
            )
            self._store_error(job, outcome, outcome.exc_type or "TaskError")
        if delivery is None:
            return None
        if defer_ack:
            return delivery
        self._ack_later([delivery])
        return None

    def _settle(self, delivery: Delivery | None, *, requeue: bool, reason: str) -> Delivery | None:
        """Requeue or dead-letter a delivery. Returns None: nothing is left for `_finish` to ack."""
        if delivery is None or self.consumer is None:
            return None
        self._unacked -= 1
        try:
            self.consumer.reject(delivery, requeue=requeue, reason=reason)
        except Exception as exc:
            self._broker_trouble("reject", exc)
        return None

    def _ignore_result(self, job: Job) -> bool:
        task = self.app.tasks.get(job.task_name)
        if task is not None and task.options.ignore_result is not None:
            return task.options.ignore_result
        return self.settings.ignore_result

    def _store(self, job: Job, status: str, result: Any, traceback: str | None = None) -> None:
        if status == SUCCESS and self._ignore_result(job):
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
                    status=FAILURE,
                    name=job.task_name,
                    result={
                        "exc_type": "TypeError",
                        "exc_module": "builtins",
                        "exc_message": [f"result is not JSON serializable: {exc}"],
                    },
                    date_done=meta.date_done,
                )
            )
        except Exception as exc:
            log.error(
                "cannot store task result; the task ran and its message is acknowledged",
                task_id=job.task_id,
                error=f"{type(exc).__name__}: {exc}",
            )

    def _store_error(self, job: Job, outcome: Outcome, exc_type: str) -> None:
        info = {
            "exc_type": outcome.exc_type or exc_type,
            "exc_module": outcome.exc_module or "millpond.exceptions",
            "exc_message": [outcome.exc_message] if outcome.exc_message else [],
        }
        self._store(job, FAILURE, info, outcome.traceback)

    def _publish_retry(self, job: Job, outcome: Outcome) -> bool:
        now = time.time()
        eta = outcome.eta if outcome.eta is not None else now + (outcome.countdown or 0.0)
        delivery = job.delivery
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
        )
        if delivery is not None:
            old = delivery.message.headers
            if "ignore_result" in old:
                message.headers["ignore_result"] = old["ignore_result"]
        if self.settings.signing_key:
            sign_message(message, self.settings.signing_key)
        log.info(
            "task will retry",
            task_id=job.task_id,
            task_name=job.task_name,
            retries=job.retries + 1,
            countdown=round(eta - now, 3),
            reason=f"{outcome.exc_type}: {outcome.exc_message}",
        )
        try:
            with telemetry.publish_span(
                job.queue,
                job.task_name,
                job.task_id,
                message.headers,
                parent=job.traceparent,
                system=self.app.broker.system,
                retries=job.retries + 1,
            ):
                self.app.broker.publish(job.queue, message, eta=eta if eta > now else None)
        except Exception as exc:
            log.error(
                "cannot publish the retry; the message goes back to the queue",
                task_id=job.task_id,
                error=f"{type(exc).__name__}: {exc}",
            )
            return False
        self._store(
            job,
            RETRY,
            {
                "exc_type": outcome.exc_type,
                "exc_module": outcome.exc_module,
                "exc_message": [outcome.exc_message],
            },
        )
        return True

    # -- shutdown --------------------------------------------------------------------------------
    def _shutdown(self) -> int:
        pool, consumer = self.pool, self.consumer
        cold = self._cold
        try:
            if pool is not None:
                if cold:
                    log.warning(
                        "cold shutdown: abandoning running tasks; their messages go back",
                        running=pool.active,
                    )
                    pool.terminate()
                else:
                    pool.stop(self.settings.shutdown_timeout)
            if len(self.inbox) and consumer is not None:
                self._complete_batch()
        finally:
            if consumer is not None:
                self._flush_acks()  # finished tasks are acknowledged before the rest goes back
                consumer.close()  # unacked (buffered, abandoned) messages return to the broker
            self._buffer.clear()
            self.app.close()
            self.inbox.waker.close()
            observability.worker_stopped(self)
        log.info(
            "worker stopped",
            worker=self.name,
            processed=self.processed,
            shutdown="cold" if cold else "warm",
        )
        return EXIT_COLD if cold else EXIT_OK
