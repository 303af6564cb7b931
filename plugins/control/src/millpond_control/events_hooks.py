"""Celery-compatible monitoring events from a millpond worker, as one hooks implementation (the
`events` entry of `millpond.hooks`), so Flower and `celery events` see millpond workers.

What is sent, like a Celery worker:

* worker events (`worker-online`, `worker-heartbeat` every `heartbeat_interval` seconds,
  `worker-offline`) whenever events are on (`[events] enabled`, the default), which is how a
  monitor knows the worker is alive;
* task events (`task-received`, `-started`, `-succeeded`, `-failed`, `-retried`, `-rejected`,
  `-revoked`) only when asked for: `millpond worker -E`, `[events] tasks = true`
  (`MILLPOND_EVENTS__TASKS`), or at run time by the `enable_events` remote-control command (which
  Flower sends every few seconds); `disable_events` stops them again.

`[events] enabled = false` switches all of it off for one worker: nothing is sent, the hooks
leave the task flow entirely, and `enable_events` is answered with an error saying so.

The hooks only build a small tuple per event and hand it to the `Emitter` (its own thread, its
own broker connection), so a slow or dead broker never holds up the consumer loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from millpond import __version__
from millpond.config.options import Section, declared, setting
from millpond.contracts.broadcast import Exchange, unavailable
from millpond.contracts.hooks import Hooks, WorkerView
from millpond.wire.protocol import Message
from millpond_control import events
from millpond_control.client import Clock
from millpond_control.emitter import Emitter, Publish
from millpond_control.registry import ControlContext, Reply, command, nok, ok

if TYPE_CHECKING:
    from millpond.contracts.pool import Job, Outcome

log = structlog.get_logger("millpond.events")


@dataclass(frozen=True)
class EventsSettings:
    """The [events] section: each field declares one setting (`SETTINGS` is derived from them)."""

    enabled: bool = setting(
        True,
        "Send worker events (online, a heartbeat every heartbeat_interval, offline) on Celery's"
        " celeryev exchange, and obey the enable_events / disable_events commands; false sends "
        "nothing at all and refuses enable_events.",
    )
    tasks: bool = setting(
        False,
        "Send task events (received, started, succeeded, failed, retried, rejected, revoked) "
        "from the start, as `millpond worker -E` does; otherwise they start when a monitor "
        "sends enable_events (Flower does every few seconds).",
    )
    heartbeat_interval: float = setting(
        2.0,
        "Seconds between worker-heartbeat events (Celery's default); monitors count a worker "
        "offline after two missed beats.",
        minimum=0.1,
        maximum=3600,
    )
    buffer: int = setting(
        10_000,
        "Events held in memory while the broker does not take them; past this, new events are "
        "dropped and the worker logs how many.",
        minimum=1,
    )
    batch: int = setting(
        100,
        "Most task events sent in one message (Celery's task.multi list); 1 sends every event "
        "on its own with its type as the routing key.",
        minimum=1,
        maximum=10_000,
    )


SETTINGS = Section("events", "Events (Flower, celery events)", declared(EventsSettings))


def event_exchange(system: str) -> Exchange:
    """`celeryev` as Celery declares it: a durable topic exchange, a fanout on Redis (where
    kombu's pub/sub would otherwise need a pattern per routing key)."""
    return Exchange(events.EXCHANGE, "fanout" if system == "redis" else "topic", durable=True)


class EventsHooks(Hooks):
    """Turns the job flow into Celery events; see the module docstring."""

    order = 90  # after tracing and log context: events never change what a task sees

    def __init__(self) -> None:
        self.tasks = False
        self.emitter: Emitter | None = None
        #: the Lamport clock when the worker has no remote-control node to share one with
        self.clock = Clock()
        self._options: dict[str, Any] = SETTINGS.defaults()
        self._switched_off = False

    # -- lifecycle -------------------------------------------------------------------------------
    def worker_starting(self, worker: WorkerView) -> None:
        self._options = dict(worker.settings.section(SETTINGS))
        if not self._options["enabled"]:
            self._switched_off = True
            self.enabled = False  # out of every call for the worker's whole life
            return
        self.tasks = bool(self._options["tasks"])

    def worker_ready(self, worker: WorkerView) -> None:
        """After the pool started (a prefork pool has forked): the emitter's thread."""
        publish = self.publisher(worker)
        if publish is None:
            self.tasks = False
            return
        software = events.software_info(__version__)
        freq = float(self._options["heartbeat_interval"])

        def worker_event(event_type: str) -> events.Pending:
            pool = worker.pool
            return events.worker_event(
                event_type,
                freq=freq,
                active=pool.active if pool is not None else 0,
                processed=worker.settler.processed,
                software=software,
            )

        # one Lamport clock per worker: its remote-control node's (which requests adjust), when
        # the worker has one
        node = getattr(worker.components.get("control"), "node", None)
        clock = getattr(node, "clock", None) or self.clock
        self.emitter = Emitter(
            publish,
            hostname=worker.name,
            clock=clock,
            worker_event=worker_event,
            freq=freq,
            limit=int(self._options["buffer"]),
            batch=int(self._options["batch"]),
        )
        self.emitter.start()
        log.info(
            "events on",
            hostname=worker.name,
            task_events=self.tasks,
            heartbeat_interval=freq,
        )

    def worker_stopped(self, worker: WorkerView) -> None:
        emitter, self.emitter = self.emitter, None
        if emitter is not None:
            emitter.stop()

    def publisher(self, worker: WorkerView) -> Publish | None:
        """How events reach the broker's `celeryev` exchange; None (with a warning saying why)
        when the broker cannot carry them."""
        broker = worker.app.broker
        if not broker.supports_broadcast:
            log.warning(
                unavailable(broker) + "; no events are sent ([events] enabled = false "
                "silences this)"
            )
            return None
        exchange = event_exchange(broker.system)
        headers = {"hostname": worker.name}

        def publish(routing_key: str, body: bytes) -> None:
            message = Message(body, dict(headers), properties={"delivery_mode": 1})
            broker.broadcast(exchange, message, routing_key)

        return publish

    # -- the task flow ---------------------------------------------------------------------------
    def received(self, job: Job) -> None:
        if self.tasks and self.emitter is not None:
            self.emitter.put(events.received(job))

    def started(self, job: Job) -> None:
        if self.tasks and self.emitter is not None:
            self.emitter.put(events.started(job))

    def finished(self, job: Job, outcome: Outcome) -> None:
        if self.tasks and self.emitter is not None:
            self.emitter.put(events.finished(job, outcome))

    # -- remote control (Celery's replies, word for word) ----------------------------------------
    def enable_events(self) -> dict[str, Any]:
        if self._switched_off or self.emitter is None:
            return nok(_OFF)
        if self.tasks:
            return ok("task events already enabled")
        self.tasks = True
        log.info("task events enabled by remote control")
        return ok("task events enabled")

    def disable_events(self) -> dict[str, Any]:
        if self._switched_off or self.emitter is None:
            return nok(_OFF)
        if not self.tasks:
            return ok("task events already disabled")
        self.tasks = False
        log.info("task events disabled by remote control")
        return ok("task events disabled")

    def heartbeat(self) -> None:
        if self.emitter is not None:
            self.emitter.heartbeat_now()


# -- the remote-control commands (Celery's names and replies) -------------------------------------


def _events_of(ctx: ControlContext) -> EventsHooks | None:
    """The worker's events hooks, if they are on (switched-off hooks leave the worker's chain)."""
    for hook in ctx.worker.hooks.hooks:
        if isinstance(hook, EventsHooks):
            return hook
    return None


_OFF = "events are switched off on this worker ([events] enabled = false, or not in hooks)"


@command(kind="control", safe=True)
def enable_events(ctx: ControlContext, **_: Any) -> Reply:
    """Start sending task events (Flower sends this every few seconds)."""
    hook = _events_of(ctx)
    return hook.enable_events() if hook is not None else nok(_OFF)


@command(kind="control", safe=True)
def disable_events(ctx: ControlContext, **_: Any) -> Reply:
    """Stop sending task events (worker heartbeats go on)."""
    hook = _events_of(ctx)
    return hook.disable_events() if hook is not None else nok(_OFF)


@command(kind="control", safe=True)
def heartbeat(ctx: ControlContext, **_: Any) -> Reply:
    """Send a worker-heartbeat event now (what `EventReceiver.capture(wakeup=True)` asks for)."""
    hook = _events_of(ctx)
    if hook is not None:
        hook.heartbeat()
    return None
