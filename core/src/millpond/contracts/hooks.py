"""The hooks contract: how cross-cutting concerns (tracing, metrics, log context, events) reach the
flow of a task without the flow knowing them.

A hooks implementation subclasses `Hooks` and overrides the methods it needs; every method is a
no-op by default. Implementations are found through the `millpond.hooks` entry-point group (the
core ships tracing, log context and metrics this way) or added in code with `app.add_hooks(...)`.
The producer, the worker loop, the pool template (`BasePool.apply_async` / `complete`) and the
execution unit call them; none of those imports tracing or metrics code.

Where each method runs, which decides what it may do:

* `before_publish` / `after_publish`: every publish, in the publishing process and thread (task
  code publishes too).
* `received`: the worker loop, when a delivery became a job. `started`: `BasePool.apply_async`, in
  the loop's thread. `finished`: `BasePool.complete`, from whatever thread the pool completes on
  (or the loop, for a job that never reached the pool).
* `enter_task` / `exit_task`: the execution unit, wherever the task runs (a thread, a child
  process, a greenlet, an asyncio task).
* `process_starting`: a millpond command (`worker`, `send`, `beat`) owns the process, before it
  imports the app or publishes (the tracing plugin installs its provider from `OTEL_*` here).
* `worker_starting`, `worker_ready`, `worker_stopped`: the worker's main thread.
  `process_started` / `process_exiting`: each child process of a pool that has them (prefork);
  `process_exiting` also when `millpond send` or `beat` ends.

`enter_task` runs inside the task's own fresh `contextvars.Context`: whatever it sets there (a
current span, log context) is seen by the task body and thrown away with the context afterwards,
so it needs no undo. `Job.carrier` is how a hook hands data from `started` (worker process) to
`enter_task` (maybe another process): a small picklable dict of text, like W3C trace headers.
`Job.span` is for the worker process only.

A hook that raises while a task goes through is logged and skipped: it never fails the task or
stops the worker. One that raises while the worker starts stops it with that error.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from millpond.contracts.pool import Job, Outcome
    from millpond.wire.protocol import Message

_log = logging.getLogger("millpond.hooks")

#: the propagation carrier of the run on whose behalf the worker publishes (a chain's next step,
#: a callback): `Millpond.publish` hands it to the publish hooks as `Publication.parent`
_publishing_for: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "millpond_publishing_for", default=None
)


@contextmanager
def publishing_for(carrier: Mapping[str, str] | None) -> Iterator[None]:
    """Publish, within this block, on behalf of the job whose carrier this is."""
    token = _publishing_for.set(carrier)
    try:
        yield
    finally:
        _publishing_for.reset(token)


def publishing_parent() -> Mapping[str, str] | None:
    return _publishing_for.get()


@dataclass(slots=True)
class Publication:
    """One message on its way to the broker, as publish hooks see it.

    Hooks may add headers to `message.headers` in `before_publish` (it runs before the message is
    signed). `parent` is a propagation carrier (W3C `traceparent`...) of the run that asked for
    this publish when it is not the caller's current context: the worker sets it for a retry.
    """

    queue: str
    message: Message
    task_id: str
    task_name: str
    retries: int = 0
    #: `messaging.system` of the broker (redis, rabbitmq, sqlite, ...)
    system: str = "millpond"
    parent: Mapping[str, str] | None = None
    eta: float | None = None


class WorkerView(Protocol):
    """What worker lifecycle hooks may read of the worker."""

    name: str
    settings: Any
    app: Any
    pool: Any
    ready: Any
    last_turn: float

    @property
    def processed(self) -> int: ...

    @property
    def prefetched(self) -> int: ...

    @property
    def accepting(self) -> bool: ...

    @property
    def broker_connected(self) -> bool: ...

    @property
    def running_inline(self) -> bool: ...

    def busy_by_queue(self) -> dict[str, tuple[int, int]]:
        """Per consumed queue: (messages waiting in the worker's buffer, jobs in the pool)."""
        ...


class Hooks:
    """Base class of hook implementations; override what you need, leave the rest."""

    #: a hook may switch itself off in `worker_starting` (metrics with no exporter configured):
    #: the worker then leaves it out of every call for its whole life
    enabled: bool = True
    #: hooks are called in this order, lowest first (then by name): tracing makes the task's span
    #: current before log context reads its ids
    order: int = 50

    # -- producer side (any process, any thread) -------------------------------------------------
    def before_publish(self, publication: Publication) -> Any:
        """Before the message goes to the broker; the return value is handed to `after_publish`."""

    def after_publish(
        self, publication: Publication, token: Any, error: BaseException | None
    ) -> None:
        """After the broker took the message (`error` None) or refused it."""

    # -- worker loop ------------------------------------------------------------------------------
    def received(self, job: Job) -> None:
        """A message was decoded and validated into a job (it may still wait for a free slot)."""

    def started(self, job: Job) -> None:
        """The job is being handed to the pool (`BasePool.apply_async`, before `on_apply`)."""

    def finished(self, job: Job, outcome: Outcome) -> None:
        """The job ended: ran, failed, was lost, or never ran (expired); once per job, any thread."""

    # -- execution unit ---------------------------------------------------------------------------
    def enter_task(self, job: Job) -> Any:
        """Just before the task body, in its fresh context; the return value goes to `exit_task`."""

    def exit_task(self, job: Job, token: Any, outcome: Outcome) -> None:
        """Just after the task body, in the same context, with how it ended."""

    # -- lifecycle --------------------------------------------------------------------------------
    def process_starting(self, service_name: str) -> None:
        """A millpond command owns this process as `service_name` (`millpond-worker`,
        `millpond-send`, `millpond-beat`); the app is not imported yet in a worker."""

    def describe_worker(self, worker: WorkerView) -> str:
        """A line for the worker's start-up banner (where an endpoint listens), or ""."""
        return ""

    def worker_starting(self, worker: WorkerView) -> None:
        """Settings read and app imported; before the pool starts (a prefork pool forks after)."""

    def worker_ready(self, worker: WorkerView) -> None:
        """The pool started and the worker consumes (threads may be started now)."""

    def worker_stopped(self, worker: WorkerView) -> None:
        """The worker stopped consuming and its pool is stopped; the app's broker and backend
        are still open (closed right after), so a hook may send a last message."""

    def process_started(self) -> None:
        """A new execution process (a prefork child) is about to run its first job."""

    def process_exiting(self) -> None:
        """A process is about to end (a prefork child through `os._exit`, `millpond send` or
        `beat` after their work): flush what is buffered."""


_LIFECYCLE = (
    "process_starting",
    "worker_starting",
    "worker_ready",
    "worker_stopped",
    "process_started",
    "process_exiting",
)


_STRICT = frozenset({"process_starting", "worker_starting", "worker_ready"})


def _overrides(hook: Hooks, name: str) -> bool:
    return getattr(type(hook), name, None) is not getattr(Hooks, name)


class HookChain:
    """The hooks of one app, with each method's implementations found once.

    Call sites pay for what is installed only: a method no hook overrides is an empty tuple, so the
    hot path of a worker with no tracing provider and no metrics does a few empty loops. Paired
    methods (`before_publish`/`after_publish`, `enter_task`/`exit_task`) are kept per hook, so each
    hook's token reaches its own second half.
    """

    def __init__(self, hooks: Iterable[Hooks] = ()) -> None:
        self.hooks: tuple[Hooks, ...] = tuple(sorted(hooks, key=lambda h: h.order))
        active = [h for h in self.hooks if h.enabled]

        def single(name: str) -> tuple[Callable[..., Any], ...]:
            return tuple(getattr(h, name) for h in active if _overrides(h, name))

        def paired(first: str, second: str) -> tuple[tuple[Callable[..., Any], ...], ...]:
            return tuple(
                (getattr(h, first), getattr(h, second))
                for h in active
                if _overrides(h, first) or _overrides(h, second)
            )

        self._publish = paired("before_publish", "after_publish")
        self._task = paired("enter_task", "exit_task")
        self._received = single("received")
        self._started = single("started")
        self._finished = single("finished")
        self._lifecycle = {name: single(name) for name in _LIFECYCLE}

    def __repr__(self) -> str:
        return f"<HookChain {[type(h).__name__ for h in self.hooks]}>"

    def active(self) -> HookChain:
        """This chain without the hooks that switched themselves off since it was made."""
        return HookChain(h for h in self.hooks if h.enabled)

    def __add__(self, more: Iterable[Hooks]) -> HookChain:
        return HookChain((*self.hooks, *more))

    # -- calls ----------------------------------------------------------------------------------
    def before_publish(self, publication: Publication) -> list[Any] | None:
        if not self._publish:
            return None
        return [_guarded(before, publication) for before, _ in self._publish]

    def after_publish(
        self, publication: Publication, tokens: list[Any] | None, error: BaseException | None
    ) -> None:
        if tokens is None:
            return
        for (_, after), token in zip(self._publish, tokens, strict=True):
            _guarded(after, publication, token, error)

    def received(self, job: Job) -> None:
        for fn in self._received:
            _guarded(fn, job)

    def started(self, job: Job) -> None:
        for fn in self._started:
            _guarded(fn, job)

    def finished(self, job: Job, outcome: Outcome) -> None:
        for fn in self._finished:
            _guarded(fn, job, outcome)

    def enter_task(self, job: Job) -> list[Any] | None:
        if not self._task:
            return None
        return [_guarded(enter, job) for enter, _ in self._task]

    def exit_task(self, job: Job, tokens: list[Any] | None, outcome: Outcome) -> None:
        if tokens is None:
            return
        for (_, exit_), token in zip(self._task, tokens, strict=True):
            _guarded(exit_, job, token, outcome)

    def lifecycle(self, name: str, *args: Any) -> None:
        """Call a lifecycle method (`worker_starting`, ..., `process_exiting`) on every hook.

        Start-up methods (`process_starting`, `worker_starting`, `worker_ready`) are not
        guarded: a hook that cannot start (a bad setting, a port in use) stops the worker (or
        `millpond send`) with its error, as any other start-up problem does. The others are
        guarded like the per-task methods.
        """
        strict = name in _STRICT
        for fn in self._lifecycle[name]:
            if strict:
                fn(*args)
            else:
                _guarded(fn, *args)


def _guarded(fn: Callable[..., Any], *args: Any) -> Any:
    """Call one hook; one that raises is logged and skipped, never the task's or loop's problem."""
    try:
        return fn(*args)
    except Exception as exc:
        hook = getattr(fn, "__self__", fn)
        _log.warning(
            "hook %s.%s failed (%s: %s); going on without it",
            type(hook).__name__,
            getattr(fn, "__name__", "?"),
            type(exc).__name__,
            exc,
            exc_info=True,
        )
        return None
