"""The worker: one consumer loop that owns all broker I/O, and a pool that runs the jobs.

The loop fetches at most `prefetch` unacknowledged messages into its own buffer and hands a job to
the pool only when it has a free slot: no pool queues work behind a long task, and a warm shutdown
gives what never started back to the broker at once. Completions come back through an `Inbox`
whose waker interrupts the broker wait; the loop then settles them in batches.

SIGTERM and the first Ctrl-C start a warm shutdown (finish running tasks, exit 0; cold after
`shutdown_timeout`); a second Ctrl-C or SIGQUIT is cold (running tasks' messages go back).
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog

from millpond.config import plugins
from millpond.config.settings import Settings, load_settings
from millpond.consume.execute import Executor
from millpond.consume.receive import Discard, Receiver
from millpond.consume.settle import Acks, Settler, ids
from millpond.contracts.broker import Consumer
from millpond.contracts.component import WorkerComponent
from millpond.contracts.pool import BasePool, Job, Outcome
from millpond.contracts.waking import Inbox
from millpond.exceptions import AccessDenied, ConfigurationError, TaskRevokedError
from millpond.observe.throttle import Throttled
from millpond.states import TaskState
from millpond.wire.protocol import PICKLE

if TYPE_CHECKING:
    from millpond.produce.app import Millpond
log = structlog.get_logger("millpond.worker")


def _first_reason(checks: list[Discard], task_id: str, headers: Mapping[str, Any]) -> str | None:
    return next((why for check in checks if (why := check(task_id, headers)) is not None), None)


class Worker:
    """Runs an app's tasks from the broker until told to stop. `run()` blocks; `stop()` is thread-safe."""

    def __init__(self, app: Millpond, *, settings: Settings | None = None, **flags: Any) -> None:
        self.app = app
        self._told = Throttled(log.info)  # expired and stale messages
        if settings is None:
            settings = load_settings(flags, code=app.code_config)
        elif flags:
            settings = settings.replace(**{k: v for k, v in flags.items() if v is not None})
        self.settings = settings
        app.configure(settings)
        self.pool_cls: type[BasePool] = plugins.load(plugins.POOLS, settings.pool)
        #: the pool's size (remote control may resize it: the prefetch count follows)
        self.concurrency = settings.concurrency or self.pool_cls.default_concurrency()
        self.multiplier = settings.prefetch_multiplier
        if settings.sources.get("prefetch_multiplier", "default") == "default":
            self.multiplier = self.pool_cls.default_prefetch_multiplier or self.multiplier
        self.queues = tuple(settings.queues)
        self.name = settings.worker_name or f"{os.getpid()}@{socket.gethostname()}"
        self.inbox: Inbox[tuple[Job, Outcome]] = Inbox()
        self.ready = threading.Event()
        self.pool: BasePool | None = None
        self.consumer: Consumer | None = None
        #: the consumer is to close (the queues change): nothing is fetched and holders give
        #: back what they hold, until `open_consumer` opens the next one
        self.closing = False
        #: fetched jobs waiting for a free pool slot (a copy is one C call, safe from any thread)
        self.buffer: deque[Job] = deque()
        #: set once a shutdown was asked for: the worker takes no new work
        self.stopping = threading.Event()
        self._cold = False
        self._stop_deadline = 0.0
        self._given_back = False
        #: whether the loop's own thread is running a task now (the solo pool)
        self.running_inline = False
        self.hooks = app.hooks
        #: monotonic time of the loop's last turn (the /livez probe)
        self.last_turn = 0.0
        #: tasks started, by name (`stats` -> `total`)
        self.totals: Counter[str] = Counter()
        self.started_at = time.time()
        #: the plugins' parts (`millpond.components`), built now so a bad setting stops the start
        self.components: dict[str, WorkerComponent] = {
            name: cls(self) for name, cls in plugins.load_all(plugins.COMPONENTS)
        }
        #: the components that may hold a task back until it may start (rate limits)
        self.holders = [c for c in self.components.values() if c.holds_tasks]
        self.discard: Discard = self._discarder()
        self._calls: deque[Callable[[], None]] = deque()
        #: the broker's prefetch window: the prefetch count plus the room the holders want
        self._window = self.prefetch
        self._resizable = True
        self.acks = Acks()  # its consumer is set when the loop opens one
        self.settler = Settler(app, settings, self.acks)
        self.receiver = Receiver(
            self.settler,
            settings.pool,
            self.pool_cls.capabilities,
            revoked=self.discard,
            defer_early_ack=self._may_hold if self.holders else None,
        )

    def _discarder(self) -> Discard:
        """The one filtering component's own method on the hot path (the usual case), all of
        them in name order when there are several (tests rebuild it after swapping components)."""
        checks: list[Discard] = [c.discard for c in self.components.values() if c.filters_tasks]
        return checks[0] if len(checks) == 1 else functools.partial(_first_reason, checks)

    def _may_hold(self, task_name: str) -> bool:
        return any(holder.may_hold(task_name) for holder in self.holders)

    # -- what hooks, probes and components read and ask -----------------------------------------
    @property
    def prefetch(self) -> int:
        """Messages held unacknowledged at most (holders keep theirs beside it)."""
        return max(1, self.concurrency * self.multiplier)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the consumer loop's thread at its next turn; safe from any thread."""
        self._calls.append(fn)
        self.inbox.waker.wake()

    def open_consumer(self, queues: tuple[str, ...]) -> None:
        """Consume from `queues`, closing the current consumer (the loop's thread, once nothing
        it delivered is held: every ack goes to the consumer that delivered the message). The
        window opens with all the room the holders may want, narrowed where it can resize."""
        if self.consumer is not None:
            self.consumer.close()
        self.queues, self.closing, self._resizable = queues, False, True
        self._window = self.prefetch + sum(h.window_room(opening=True) for h in self.holders)
        self.consumer = self.acks.consumer = self.app.broker.consumer(queues, self._window)

    def stop(self, cold: bool = False) -> None:
        """Ask the worker to shut down (warm by default); safe from any thread."""
        self._cold = self._cold or cold
        if not self.stopping.is_set():
            self._stop_deadline = time.monotonic() + self.settings.shutdown_timeout
            self.stopping.set()
        if self.pool is not None and not self.pool.started:
            self.pool.start_cancelled.set()  # still starting: stop that first
        self.inbox.waker.wake()

    def _install_signals(self) -> None:
        current, main = threading.current_thread(), threading.main_thread()
        # by name and type, not identity: eventlet's main greenthread is a new `_MainThread`
        # object, and only the main thread may install signal handlers
        if (current.name, type(current).__name__) != (main.name, type(main).__name__):
            return

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if name == "SIGQUIT" or (name == "SIGINT" and self.stopping.is_set()):
                log.warning("cold shutdown requested", signal=name)
                self.stop(cold=True)
                if self.running_inline:  # the solo pool runs the task in this thread: interrupt it
                    raise KeyboardInterrupt
                return
            running = self.pool.active if self.pool else 0
            log.info("warm shutdown requested", signal=name, running=running)
            self.stop()

        for name in ("SIGTERM", "SIGINT", "SIGQUIT"):  # Windows has no SIGQUIT
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), on_signal)

    def run(self) -> int:
        """Run until stopped; returns the exit code (0 after a warm shutdown)."""
        if PICKLE in self.settings.accept_content:
            log.warning(
                "accept_content allows pickle: any producer that can reach the broker can "
                "run code in this worker; allow it only if every producer is trusted"
            )
        self.receiver.check_time_limits()
        self.hooks.worker_starting(self)
        self.hooks = self.hooks.active()  # without the hooks that switched themselves off
        self.app.use_hooks(self.hooks.hooks)
        self.app.broker.connect()
        self.app.broker.declare(self.queues)
        _ = self.app.backend  # resolve it now: a bad backend URL fails at start-up
        try:
            self.pool = self.pool_cls(
                self.concurrency,
                self._on_complete,
                self.settings.plugin_options(self.settings.pool),  # the pool's own section
                execution=Executor(self.app, self.hooks),
            )
        except ValueError as exc:  # the pool contract's refusal of a concurrency or an option
            raise ConfigurationError(str(exc)) from exc
        self._install_signals()
        self.pool.start()  # prefork forks here: after the app import, before consumer threads
        if self.stopping.is_set():  # told to stop while the pool started: consume nothing
            return self._shutdown()
        # before the first fetch: a task revoked before this worker started never runs here
        for component in self.components.values():
            component.start()
        self.open_consumer(self.queues)
        try:
            self.hooks.worker_ready(self)  # metrics, probes: after the pool forked
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
        assert self.pool is not None
        pool, waker = self.pool, self.inbox.waker
        while True:
            self.last_turn = time.monotonic()
            # first: what comes from here on (a completion, a call, a stop) ends the wait below,
            # and a wake-up already acted on cannot spin the loop (hammering the broker, starving
            # a green pool's tasks); a solo task's mid-turn settle leaves the waker alone
            waker.clear()
            self._complete_batch()
            while self._calls:
                try:
                    self._calls.popleft()()
                except Exception:
                    log.exception("a remote-control action failed on the worker loop")
            if not self.stopping.is_set():
                self._dispatch_buffered()
                if self._fetch():
                    continue
            elif self._cold:
                return
            else:
                if not self._given_back:
                    self._give_back_buffered()
                self._dispatch_buffered()  # what was acked on receipt is ours to run
                if not (pool.active or self.buffer):
                    return
                if time.monotonic() > self._stop_deadline:
                    log.warning(
                        "warm shutdown timed out; going cold",
                        timeout=self.settings.shutdown_timeout,
                        running=pool.active,
                    )
                    self._cold = True
                    return
            self.acks.flush()
            waker.wait(self._wait(0.5))

    def _fetch(self) -> bool:
        """Fetch what the window has room for and receive it; False: no room, the loop waits."""
        for component in self.components.values():
            component.tend()  # the control plane's may open another consumer
        acks, holders, consumer = self.acks, self.holders, self.consumer
        assert consumer is not None
        window = self.prefetch + sum(holder.window_room() for holder in holders)
        # a consumer that cannot resize (a quorum queue's) keeps the window it opened with
        if window != self._window and self._resizable:
            self._resizable = consumer.resize(window)
            if self._resizable:
                self._window = window
            elif self._window < self.prefetch + sum(h.window_room(opening=True) for h in holders):
                log.warning(
                    "this broker's consumer cannot widen its prefetch window at run time: "
                    "messages held back (rate-limited ones waiting for a token) take room from "
                    "other tasks until the worker restarts"
                )
        room = self.prefetch - acks.held + sum(holder.beside_window() for holder in holders)
        if self.closing or room <= 0:
            return False
        acks.flush()
        try:
            deliveries = consumer.fetch(room, self._wait(1.0), self.inbox.waker)
        except AccessDenied:
            raise  # credentials or permissions: no retry cures it; stop and say so
        except Exception as exc:
            # Brokers reconnect inside fetch; one that raises instead must not take the worker
            # down: what it held unacknowledged comes back (at-least-once).
            acks.trouble("fetch", exc)
            self.inbox.waker.wait(acks.backoff)
            return True
        acks.backoff = 0.1
        for delivery in deliveries:
            if (job := self.receiver.receive(delivery)) is None:
                continue
            self.hooks.received(job)
            if self._answered(job, "expired before a worker received it"):
                continue
            if not any(holder.hold(job) for holder in holders):
                self.buffer.append(job)
        return True

    def _wait(self, longest: float) -> float:
        """How long the loop may block: less when a held job may start and the pool has a slot
        (with the pool full, a completion wakes the loop anyway)."""
        pool = self.pool
        if not self.holders or pool is None or pool.active >= pool.capacity:
            return longest
        dues = (holder.next_release() for holder in self.holders)
        return min([longest, *(max(due, 0.001) for due in dues if due is not None)])

    def _answered(self, job: Job, expired: str) -> bool:
        """Whether the job was ended without the pool, REVOKED (revoked, or `expired`)."""
        why = self.discard(job.task_id, job.headers)
        if why is not None:
            log.info("discarding a revoked task", **ids(job))
        elif job.expires is not None and time.time() > job.expires:
            why = expired
            self._told.log(
                "expired",
                "task not run: " + why,
                **ids(job),
                expires=job.expires,
                state=TaskState.REVOKED.value,
            )
        else:
            return False
        outcome = Outcome.of(TaskRevokedError(why), TaskState.REVOKED)
        self.hooks.finished(job, outcome)
        self.settler.finish(job, outcome)
        return True

    def _give_back_buffered(self) -> None:
        """Warm shutdown: unstarted messages go back to the broker now, so another worker runs
        them (rather than after the close, or their lease or visibility timeout)."""
        self._given_back = True
        jobs = [*self.buffer, *(job for holder in self.holders for job in holder.drain())]
        self.buffer.clear()
        self.acks.flush()  # finished tasks' acks first: the release must not overtake them
        # acknowledged on receipt (acks_late off): the broker has them no more, they run here
        owned = [job for job in jobs if job.delivery is None]
        self.buffer.extend(owned)
        count = self.acks.release([job.delivery for job in jobs if job.delivery is not None])
        if count or owned:
            log.info(
                "warm shutdown: gave back buffered messages to the broker",
                given_back=count,
                kept_to_run=len(owned),
                running=self.pool.active if self.pool else 0,
            )

    def _dispatch_buffered(self) -> None:
        """Start jobs while the pool has room, one a holder releases first; once stopping, only
        those the warm stop kept to run (after the give-back)."""
        pool, buffer, consumer = self.pool, self.buffer, self.consumer
        assert pool is not None
        while pool.active < pool.capacity and (self._given_back or not self.stopping.is_set()):
            job = next((j for h in self.holders if (j := h.release()) is not None), None)
            if job is None:
                if not buffer:
                    return
                job = buffer.popleft()
            if consumer is not None and job.delivery is not None and consumer.stale(job.delivery):
                # never started: only a task already running may run twice
                self._told.log(
                    "stale",
                    "not starting a buffered message: the broker may have given it to another "
                    "worker while this one was stalled (lease lapsed or connection lost); it "
                    "goes back",
                    **ids(job),
                )
                self.acks.reject(job.delivery, requeue=True, reason="stale after a stall")
                continue
            if self._answered(job, "expired before it could start"):
                continue
            job.started = time.monotonic()
            self.totals[job.task_name] += 1
            inline = self.running_inline = not pool.capabilities.concurrent  # solo: here, now
            try:
                pool.apply_async(job)
            finally:
                self.running_inline = False
            if inline:
                self._complete_batch()

    # -- completions -----------------------------------------------------------------------------
    def _on_complete(self, job: Job, outcome: Outcome) -> None:
        """Called by the pool, from any thread: hand over to the loop (no wake-up for solo's)."""
        self.inbox.put((job, outcome), wake=not self.running_inline)

    def _complete_batch(self) -> None:
        for job, outcome in self.inbox.drain():
            self.settler.finish(job, outcome)

    def _shutdown(self) -> int:
        pool, consumer, cold = self.pool, self.consumer, self._cold
        for component in self.components.values():
            try:
                component.stop()
            except Exception:
                log.exception("a worker component failed to stop", component=type(component))
        try:
            if pool is not None and cold:
                log.warning(
                    "cold shutdown: abandoning running tasks; their messages go back",
                    running=pool.active,
                )
                pool.terminate()
            elif pool is not None:
                pool.stop(self.settings.shutdown_timeout)
            self._complete_batch()
        finally:
            if consumer is not None:
                self.acks.flush()  # finished tasks are acknowledged before the rest goes back
                consumer.close()  # unacked (buffered, abandoned) messages return to the broker
            lost = [job for job in self.buffer if job.delivery is None]
            if lost:  # a cold stop (or a warm one cut short) before they could run
                log.warning(
                    "tasks acknowledged on receipt (acks_late off) were not run: at-most-once",
                    count=len(lost),
                    task_ids=[job.task_id for job in lost[:20]],
                )
            self.buffer.clear()
            # before the app's connections close: a hook may still send (events' worker-offline)
            self.hooks.worker_stopped(self)
            self.app.close()
            self.inbox.waker.close()
        log.info(
            "worker stopped",
            worker=self.name,
            processed=self.settler.processed,
            shutdown="cold" if cold else "warm",
        )
        return 1 if cold else 0
