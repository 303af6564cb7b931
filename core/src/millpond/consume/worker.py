"""The worker: one consumer loop that owns all broker I/O, and a pool that runs the jobs.

The loop fetches at most `prefetch` unacknowledged messages, decodes and validates each, and keeps
the resulting jobs in its own buffer. It hands a job to the pool only when the pool has a free slot,
so no pool ever queues work behind a long task (no head-of-line blocking), and a warm shutdown
gives the jobs that never started back to the broker at once (`Consumer.release`), so other
workers run them while this one finishes its running tasks. Completions come back through an
`Inbox` whose waker interrupts the broker wait at once; the loop then stores results, publishes
retries and acknowledges, in batches.

Signals: SIGTERM and the first Ctrl-C start a warm shutdown (stop fetching, finish running tasks,
ack them, exit 0, turning cold after `shutdown_timeout`); a second Ctrl-C or SIGQUIT is a cold
shutdown (running tasks are abandoned and their messages go back to the broker).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog

from millpond.config import plugins
from millpond.config.settings import Settings, load_settings
from millpond.consume.execute import Executor
from millpond.consume.receive import Receiver
from millpond.consume.settle import Acks, Settler
from millpond.contracts.broker import Consumer, mask_url
from millpond.contracts.component import WorkerComponent
from millpond.contracts.pool import BasePool, Job, Outcome
from millpond.contracts.waking import Inbox
from millpond.exceptions import AccessDenied, ConfigurationError, MillpondError
from millpond.observe.throttle import Throttled
from millpond.states import TaskState
from millpond.wire.protocol import PICKLE

if TYPE_CHECKING:
    from millpond.produce.app import Millpond
log = structlog.get_logger("millpond.worker")

#: worker exit codes
EXIT_OK = 0
EXIT_COLD = 1
EXIT_ERROR = 2


def _copied(copy: Callable[[], list[Job]]) -> list[Job]:
    """A copy of what the loop keeps (its buffer, its holders'), from another thread: the loop
    may change it while it is copied (RuntimeError), so try again, a few times."""
    for _ in range(10):
        try:
            return copy()
        except RuntimeError:
            continue
    return []


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
        #: expired messages are told at INFO, at most one line per 10 s (with how many were not)
        self._told = Throttled(log.info)
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
        self._stop = threading.Event()
        self._cold = False
        self._stop_deadline: float | None = None
        self._given_back = False
        self._inline = False
        self.hooks = app.hooks
        #: monotonic time of the consumer loop's last iteration (read by the /livez probe)
        self.last_turn = 0.0
        #: tasks started, by name (`stats` -> `total`)
        self.totals: Counter[str] = Counter()
        self.started_at = time.time()
        #: the parts plugins add (`millpond.components`: the control plane), by entry-point name
        #: (built now: a bad setting of one stops the start)
        self.components: dict[str, WorkerComponent] = {
            name: cls(self) for name, cls in plugins.components()
        }
        #: the components that may hold a task back until it may start (rate limits)
        self._holders = [c for c in self.components.values() if c.holds_tasks]
        #: why a task must not run (revoked), or None; the components' filters, or none at all
        self.discard: Callable[[str, Any], str | None] = self._discarder()
        #: functions other threads ask the loop to run on its next turn (`call_soon`)
        self._calls: deque[Callable[[], None]] = deque()
        #: the queues to consume once what the current consumer delivered is settled
        self._next_queues: tuple[str, ...] | None = None
        #: the broker's prefetch window: the prefetch count plus what the holders hold beside it
        self._window = self.prefetch
        self._resizable = True
        #: the steps of a message's trip: receive, (execute, in the pool), settle and ack
        self.acks = Acks()  # its consumer is set when the loop opens one
        self.settler = Settler(app, settings, self.acks)
        self.receiver = Receiver(
            app,
            settings,
            self.acks,
            settings.pool,
            self.pool_cls.capabilities,
            rejoin=self.settler.rejoin,
            revoked=self.discard,
            defer_early_ack=self._may_hold if self._holders else None,
        )

    def _discarder(self) -> Callable[[str, Any], str | None]:
        """One function for the hot path: the one filtering component's own method when there
        is one (the usual case), all of them in name order when there are several."""
        filters = [c.discard for c in self.components.values() if c.filters_tasks]
        if len(filters) == 1:
            return filters[0]

        def discard(task_id: str, headers: Any) -> str | None:
            for check in filters:
                why = check(task_id, headers)
                if why is not None:
                    return why
            return None

        return discard

    # -- what hooks and probes read (`millpond.contracts.hooks.WorkerView`) -----------------------
    @property
    def processed(self) -> int:
        return self.settler.processed

    @property
    def prefetched(self) -> int:
        """Messages fetched and waiting in the worker's buffer for a free pool slot."""
        return len(self._buffer)

    def busy_by_queue(self) -> dict[str, tuple[int, int]]:
        """Per consumed queue: (messages waiting in the buffer, jobs in the pool); safe from any
        thread (the metrics collector's), the buffer being copied under the GIL."""
        out = dict.fromkeys(self.queues, (0, 0))
        for job in _copied(lambda: list(self._buffer)):
            held, busy = out.get(job.queue, (0, 0))
            out[job.queue] = (held + 1, busy)
        for job in self.pool.active_jobs() if self.pool is not None else []:
            held, busy = out.get(job.queue, (0, 0))
            out[job.queue] = (held, busy + 1)
        return out

    @property
    def accepting(self) -> bool:
        return not self._stop.is_set()

    @property
    def broker_connected(self) -> bool:
        return bool(self.consumer is not None and self.consumer.connected)

    @property
    def running_inline(self) -> bool:
        """Whether the loop's own thread is running a task now (the solo pool)."""
        return self._inline

    # -- what remote control reads and asks (millpond_control.commands) -------------------------
    def buffered_jobs(self) -> list[Job]:
        """Jobs received and waiting for a pool slot, or for a rate limit's token (Celery lists
        those as reserved too); safe from any thread."""
        return _copied(lambda: [j for h in self._holders for j in h.held()] + list(self._buffer))

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the consumer loop's thread at its next turn; safe from any thread."""
        self._calls.append(fn)
        self.inbox.waker.wake()

    def wake(self) -> None:
        """Make the loop look at its buffer again (a revoke arrived)."""
        self.inbox.waker.wake()

    def resized(self, concurrency: int) -> None:
        """The pool was resized at run time: follow with the prefetch window."""
        multiplier = max(1, self.prefetch // max(1, self.concurrency))
        self.concurrency = concurrency
        self.prefetch = max(1, concurrency * multiplier)

    def change_queues(self, *, add: str | None = None, remove: str | None = None) -> None:
        """Consume from one more queue, or one fewer (the loop's thread only). The loop stops
        fetching, lets what it holds finish and be acknowledged, then reopens its consumer on
        the new set: every ack goes to the consumer that delivered the message."""
        queues = list(self._next_queues or self.queues)
        if add and add not in queues:
            self.app.broker.declare([add])
            queues.append(add)
        if remove and remove in queues and len(queues) > 1:
            queues.remove(remove)
        if tuple(queues) != self.queues:
            self._next_queues = tuple(queues)

    def _maybe_swap_consumer(self) -> None:
        """The queue change, once nothing fetched from the old consumer is held."""
        acks = self.acks
        if self._next_queues is None or self.consumer is None:
            return
        acks.flush()
        if acks.held > 0 or self._buffer:
            return
        old, self.queues, self._next_queues = self.consumer, self._next_queues, None
        old.close()
        self.consumer = self.app.broker.consumer(self.queues, self._open_window())
        acks.consumer = self.consumer
        log.info("consuming from new queues", queues=list(self.queues))

    def _run_calls(self) -> None:
        while self._calls:
            fn = self._calls.popleft()
            try:
                fn()
            except Exception:
                log.exception("a remote-control action failed on the worker loop")

    # -- control ---------------------------------------------------------------------------------
    def stop(self, cold: bool = False) -> None:
        """Ask the worker to shut down (warm by default); safe from any thread."""
        if cold:
            self._cold = True
        if not self._stop.is_set():
            self._stop.set()
            self._stop_deadline = time.monotonic() + self.settings.shutdown_timeout
        if self.pool is not None and not self.pool.started:
            self.pool.start_cancelled.set()  # still starting: stop that first
        self.inbox.waker.wake()

    # -- what components hold back (rate limits) -----------------------------------------------
    def _may_hold(self, task_name: str) -> bool:
        return any(holder.may_hold(task_name) for holder in self._holders)

    def _open_window(self) -> int:
        """The window a new consumer starts with: the prefetch count and all the room holders
        may want, narrowed on the loop's first turn where the consumer can resize."""
        self._resizable = True
        self._window = self.prefetch + sum(h.window_room(opening=True) for h in self._holders)
        return self._window

    def _resize_window(self, window: int) -> None:
        """Follow what the holders want beside the prefetch count (and a pool resized at run
        time); a consumer that cannot resize (a quorum queue's) keeps the window it opened with."""
        if self.consumer is None or not self._resizable:
            return
        if self.consumer.resize(window):
            self._window = window
            return
        self._resizable = False
        if self._window < self.prefetch + sum(h.window_room(opening=True) for h in self._holders):
            log.warning(
                "this broker's consumer cannot widen its prefetch window at run time: "
                "messages held back (rate-limited ones waiting for a token) take room from "
                "other tasks until the worker restarts"
            )

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
                running=self.pool.active if self.pool else 0,
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

    # -- start-up --------------------------------------------------------------------------------
    def banner(self) -> str:
        tasks = sorted(self.app.tasks)
        results = mask_url(self.settings.result_backend) or (
            "(kept by the broker)"
            if self.app.backend is not None
            else "(none: this broker keeps no results; set result_backend to store them)"
        )
        lines = [
            f"millpond {plugins.core_version()} worker {self.name}",
            f"  app:         {self.app.name}",
            f"  broker:      {mask_url(self.app.broker_url)}",
            f"  results:     {results}",
            f"  pool:        {self.settings.pool} (concurrency {self.concurrency}, "
            f"prefetch {self.prefetch})",
            f"  queues:      {', '.join(self.queues)}",
        ]
        lines += [f"  {line}" for hook in self.hooks.hooks if (line := hook.describe_worker(self))]
        lines += [
            f"  tasks ({len(tasks)}):",
            *(
                f"    . {name}{''.join(h.describe_task(name) for h in self._holders)}"
                for name in tasks
            ),
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
        if PICKLE in self.settings.accept_content:
            log.warning(
                "accept_content allows pickle: any producer that can reach the broker can "
                "run code in this worker; allow it only if every producer is trusted"
            )
        self._check_capabilities()
        broker = self.app.broker
        self.hooks.lifecycle("worker_starting", self)
        self.hooks = self.hooks.active()  # without the hooks that switched themselves off
        self.app.use_hooks(self.hooks)
        broker.connect()
        broker.declare(self.queues)
        _ = self.app.backend  # resolve it now: a bad backend URL fails at start-up
        execution = Executor(self.app, self.hooks)
        try:
            self.pool = self.pool_cls(
                self.concurrency,
                self._on_complete,
                # the validated values of the settings section the pool publishes under its name
                self.settings.plugin_options(self.settings.pool),
                execution=execution,
            )
        except ValueError as exc:  # the pool contract's refusal of a concurrency or an option
            raise ConfigurationError(str(exc)) from exc
        self._install_signals()
        self.pool.start()  # prefork forks here: after the app import, before consumer threads
        if self._stop.is_set():  # told to stop while the pool started: consume nothing
            return self._shutdown()
        # the plugins' components (the control plane learns the running workers' revokes, then
        # answers remote control), before the first fetch: a task revoked before this worker
        # started never runs here
        for component in self.components.values():
            component.start()
        self.consumer = self.acks.consumer = broker.consumer(self.queues, self._open_window())
        code = EXIT_OK
        try:
            self.hooks.lifecycle("worker_ready", self)  # metrics, probes: after the pool forked
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

    # -- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        assert self.consumer is not None
        assert self.pool is not None
        consumer, pool, inbox, acks = self.consumer, self.pool, self.inbox, self.acks
        holders = self._holders
        receive = self.receiver.receive
        waker = inbox.waker
        while True:
            self.last_turn = time.monotonic()
            if self._calls:
                self._run_calls()
            if len(inbox):
                self._complete_batch()
            if self._stop.is_set():
                if not self._cold and not self._given_back:
                    self._give_back_buffered()
                if not self._cold and self._buffer:
                    self._dispatch_buffered(pool, stopping=True)  # acked on receipt: ours to run
                if self._cold or not (pool.active or self._buffer):
                    return
                if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
                    log.warning(
                        "warm shutdown timed out; going cold",
                        timeout=self.settings.shutdown_timeout,
                        running=pool.active,
                    )
                    self._cold = True
                    return
            else:
                self._dispatch_buffered(pool)
                if self._next_queues is not None:
                    self._maybe_swap_consumer()
                    assert self.consumer is not None
                    consumer = self.consumer
                beside = extra = 0
                if holders:
                    closing = self._next_queues is not None
                    for holder in holders:
                        holder.tend(closing=closing)
                        beside += holder.beside_window()
                        extra += holder.window_room()
                if self.prefetch + extra != self._window:
                    self._resize_window(self.prefetch + extra)
                # held messages (rate-limited ones) wait beside the window, not in it
                room = self.prefetch - (acks.held - beside) if self._next_queues is None else 0
                if room > 0:
                    acks.flush()
                    try:
                        deliveries = consumer.fetch(room, self._wait(1.0), waker)
                    except AccessDenied:
                        raise  # credentials or permissions: no retry cures it; stop and say so
                    except Exception as exc:
                        # Brokers reconnect inside fetch; one that raises instead must not take
                        # the worker down: what it held unacknowledged comes back (at-least-once).
                        acks.trouble("fetch", exc)
                        waker.wait(acks.backoff)
                        continue
                    acks.backoff = 0.1
                    if deliveries:
                        for delivery in deliveries:
                            job = receive(delivery)
                            if job is not None:
                                self._received(job)
                        self._dispatch_buffered(pool)
                    continue
            if waker.is_set and not len(inbox):
                # stop()'s wake-up, already acted on: clear it, or this wait returns at once and
                # the loop spins (starving a green pool's tasks, so a warm stop never finishes)
                waker.clear()
                if len(inbox):
                    continue
            acks.flush()
            waker.wait(self._wait(0.5))

    def _wait(self, longest: float) -> float:
        """How long the loop may block: `longest`, or less when a held job may start and the
        pool has a slot for it (with the pool full, a completion wakes the loop anyway)."""
        pool = self.pool
        if not self._holders or pool is None or pool.active >= pool.capacity:
            return longest
        for holder in self._holders:
            due = holder.next_release()
            if due is not None:
                longest = min(longest, max(due, 0.001))
        return longest

    def _received(self, job: Job) -> None:
        self.hooks.received(job)
        if not self._answered(job, "expired before a worker received it"):
            for holder in self._holders:
                if holder.hold(job):
                    return
            self._buffer.append(job)

    def _answered(self, job: Job, expired: str) -> bool:
        """End a job that must not run, revoked or expired (`expired` says when it was found),
        without the pool: REVOKED, with its hooks and its ack. Whether it was."""
        why = self.discard(job.task_id, job.headers)
        if why is not None:
            log.info("discarding a revoked task", task_id=job.task_id, task_name=job.task_name)
        elif job.expires is not None and time.time() > job.expires:
            why = expired
            self._told.log(
                "expired",
                "task not run: " + why,
                task_id=job.task_id,
                task_name=job.task_name,
                expires=job.expires,
                state=TaskState.REVOKED.value,
            )
        else:
            return False
        outcome = Outcome.revoked(why)
        self.hooks.finished(job, outcome)
        self.settler.finish(job, outcome)
        return True

    def _give_back_buffered(self) -> None:
        """Warm shutdown: the prefetched messages that never started go back to the broker now,
        so another worker runs them while this one finishes its running tasks (they would
        otherwise wait for the close, or for their lease or visibility timeout to lapse)."""
        self._given_back = True
        jobs = list(self._buffer)
        self._buffer.clear()
        for holder in self._holders:
            jobs += holder.drain()  # held beside the window (rate-limited ones)
        self.acks.flush()  # finished tasks' acks first: the release must not overtake them
        # acknowledged when they arrived (acks_late off): the broker has them no more, so they
        # run here before the worker exits, as the running ones do
        owned = [job for job in jobs if job.delivery is None]
        self._buffer.extend(owned)
        count = self.acks.release([job.delivery for job in jobs if job.delivery is not None])
        if count or owned:  # an idle worker's stop says nothing about a buffer it did not have
            log.info(
                "warm shutdown: gave back buffered messages to the broker",
                given_back=count,
                kept_to_run=len(owned),
                running=self.pool.active if self.pool else 0,
            )

    def _dispatch_buffered(self, pool: BasePool, *, stopping: bool = False) -> None:
        """Start buffered jobs while the pool has room; once a stop is asked only when
        `stopping` (the warm stop running what was acknowledged on receipt)."""
        buffer, consumer, holders = self._buffer, self.consumer, self._holders
        while pool.active < pool.capacity and (stopping or not self._stop.is_set()):
            # a held job that may start goes first: it was received before the buffer's
            job = None
            for holder in holders:
                job = holder.release()
                if job is not None:
                    # acknowledged as it starts if its task acks early, not when received, so
                    # its message could wait in the holder and go back to the broker
                    task = self.app.tasks.get(job.task_name)
                    if job.delivery is not None and self.receiver.acks_early(task):
                        self.acks.ack_now([job.delivery])
                        job.delivery = None
                    break
            if job is None:
                if not buffer:
                    return
                job = buffer.popleft()
            if consumer is not None and job.delivery is not None and consumer.stale(job.delivery):
                # the broker may have handed it to another worker while this one was stalled:
                # never start it (only tasks already running may run twice); give it back
                self._told.log(
                    "stale",
                    "not starting a buffered message: the broker may have given it to another "
                    "worker while this one was stalled (lease lapsed or connection lost); it "
                    "goes back",
                    task_id=job.task_id,
                    task_name=job.task_name,
                )
                self.acks.reject(job.delivery, requeue=True, reason="stale after a stall")
                continue
            if self._answered(job, "expired before it could start"):
                continue
            job.started = time.monotonic()
            self.totals[job.task_name] += 1
            if pool.capabilities.concurrent:
                pool.apply_async(job)
                continue
            self._inline = True  # the solo pool runs it here, now
            try:
                pool.apply_async(job)
            finally:
                self._inline = False
            if len(self.inbox):
                self._complete_batch()

    # -- completions -----------------------------------------------------------------------------
    def _on_complete(self, job: Job, outcome: Outcome) -> None:
        """Called by the pool, from any thread: hand over to the loop."""
        if self._inline:  # the solo pool, in the loop's own thread: no wake-up needed
            self.inbox.put_quiet((job, outcome))
        else:
            self.inbox.put((job, outcome))

    def _complete_batch(self) -> None:
        finish = self.settler.finish
        for job, outcome in self.inbox.drain():
            finish(job, outcome)

    # -- shutdown --------------------------------------------------------------------------------
    def _shutdown(self) -> int:
        pool, consumer = self.pool, self.consumer
        cold = self._cold
        for component in self.components.values():
            try:
                component.stop()
            except Exception:
                log.exception("a worker component failed to stop", component=type(component))
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
            if len(self.inbox):
                self._complete_batch()
        finally:
            if consumer is not None:
                self.acks.flush()  # finished tasks are acknowledged before the rest goes back
                consumer.close()  # unacked (buffered, abandoned) messages return to the broker
            lost = [job for job in self._buffer if job.delivery is None]
            if lost:  # a cold stop (or a warm one cut short) before they could run
                log.warning(
                    "tasks acknowledged on receipt (acks_late off) were not run: at-most-once",
                    count=len(lost),
                    task_ids=[job.task_id for job in lost[:20]],
                )
            self._buffer.clear()
            # before the app's connections close: a hook may still send (events' worker-offline)
            self.hooks.lifecycle("worker_stopped", self)
            self.app.close()
            self.inbox.waker.close()
        log.info(
            "worker stopped",
            worker=self.name,
            processed=self.processed,
            shutdown="cold" if cold else "warm",
        )
        return EXIT_COLD if cold else EXIT_OK
