"""The hooks contract: how cross-cutting concerns (tracing, metrics, log context, events) reach the
flow of a task without the flow knowing them.

An implementation subclasses `Hooks` and is found through the `millpond.hooks` entry-point group or
added with `app.add_hooks(...)`; the producer, the worker loop, the pool template and the execution
unit call hooks through a `HookChain`, importing no tracing or metrics code. Each method says where
it runs. `Job.carrier` hands data from `started` (worker process) to `enter_task` (maybe another
process): a small picklable dict of text, like W3C trace headers; `Job.span` stays in the worker
process. A hook raising as a task goes through is logged and skipped, never failing the task or the
worker; one raising as the worker starts stops it with its error.
"""

from __future__ import annotations

import contextvars
import logging
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from millpond.consume.worker import Worker
    from millpond.contracts.pool import Job, Outcome
    from millpond.wire.protocol import Message

_log = logging.getLogger("millpond.hooks")

#: what worker lifecycle hooks are handed: the worker, as components are (named, not imported)
WorkerView: TypeAlias = "Worker"

#: the carrier `Publication.parent` reads when it is made
_publishing_for: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "millpond_publishing_for", default=None
)


@contextmanager
def publishing_for(carrier: Mapping[str, str] | None) -> Iterator[None]:
    """Publish, within this block, on behalf of the job whose carrier this is (the worker's
    retries, a chain's next step, a callback): their `publish` spans are that job's children."""
    token = _publishing_for.set(carrier)
    try:
        yield
    finally:
        _publishing_for.reset(token)


@dataclass(slots=True)
class Publication:
    """One message on its way to the broker, as publish hooks see it; `before_publish` may add to
    `message.headers` (it runs before signing). `parent`: the carrier of the `publishing_for` block
    around it, the run this publish is for when that is not the caller's current context."""

    queue: str
    message: Message
    task_id: str
    task_name: str
    retries: int = 0
    #: `messaging.system` of the broker (redis, rabbitmq, sqlite, ...)
    system: str = "millpond"
    parent: Mapping[str, str] | None = field(default_factory=_publishing_for.get)
    eta: float | None = None


class Hooks:
    """Base class of hook implementations: every method is a no-op; override what you need."""

    #: a hook may turn this off in `worker_starting` (metrics, no exporter): left out from then on
    enabled: bool = True
    #: lowest first, ties in order (installed by name): tracing sets its span before logs read it
    order: int = 50

    def before_publish(self, publication: Publication) -> Any:
        """Before the message goes to the broker, in the publishing thread (tasks publish too);
        the return value is handed to `after_publish`."""

    def after_publish(
        self, publication: Publication, token: Any, error: BaseException | None
    ) -> None:
        """After the broker took the message (`error` None) or refused it."""

    def received(self, job: Job) -> None:
        """In the worker loop's thread: a message became a valid job (it may wait for a slot)."""

    def started(self, job: Job) -> None:
        """In the worker loop's thread: the job goes to the pool (before `on_apply`)."""

    def finished(self, job: Job, outcome: Outcome) -> None:
        """Once per job, in the thread the pool completes on (the loop's for a job that never
        reached the pool): it ran, failed, was lost, or never ran (expired)."""

    def enter_task(self, job: Job) -> Any:
        """Just before the task body, in the execution unit and the task's fresh
        `contextvars.Context`: what it sets there (a current span, log context) is seen by the
        body and thrown away with the context, so needs no undo. Returns `exit_task`'s token."""

    def exit_task(self, job: Job, token: Any, outcome: Outcome) -> None:
        """Just after the task body, in the same context, with how it ended."""

    def process_starting(self, service_name: str) -> None:
        """A millpond command owns this process as `service_name` (`millpond-worker`, `-send`,
        `-beat`), before importing the app or publishing (tracing sets up its `OTEL_*` provider)."""

    def describe_worker(self, worker: WorkerView) -> str:
        """A line for the worker's start-up banner (where an endpoint listens), or ""."""
        return ""

    def worker_starting(self, worker: WorkerView) -> None:
        """In the worker's main thread, as are the other `worker_*`: settings read, app imported,
        the pool not started yet (a prefork pool forks after)."""

    def worker_ready(self, worker: WorkerView) -> None:
        """The pool started and the worker consumes (threads may be started now)."""

    def worker_stopped(self, worker: WorkerView) -> None:
        """Consuming and the pool stopped; the broker and backend stay open for a last message."""

    def process_started(self) -> None:
        """A new execution process (a prefork child) is about to run its first job."""

    def process_exiting(self) -> None:
        """A process is about to end (a prefork child through `os._exit`, `millpond send` or
        `beat` after their work): flush what is buffered."""


#: the methods called one by one, every hook's in turn
_SINGLE = (
    *("received", "started", "finished", "process_starting", "worker_starting"),
    *("worker_ready", "worker_stopped", "process_started", "process_exiting"),
)
#: not guarded: a hook unable to start (a bad setting, a port in use) stops the command, saying why
_STRICT = frozenset({"process_starting", "worker_starting", "worker_ready"})
#: the paired methods: each hook's token from the first half reaches its own second half
_PAIRED = {"before_publish": "after_publish", "enter_task": "exit_task"}
_Calls = Sequence[Callable[..., Any]]


class HookChain(Hooks):
    """The hooks of one app, called as one (`chain.started(job)` calls each hook's `started` in
    `order`; a paired method's token lists each hook's). A method's implementations are found once,
    so one no hook overrides costs an empty call: no tracing and no metrics cost next to nothing."""

    def __init__(self, hooks: Iterable[Hooks] = ()) -> None:
        self.hooks = tuple(sorted((h for h in hooks if h.enabled), key=lambda h: h.order))
        for name in _SINGLE:
            fns = [getattr(h, name) for h in self.hooks if _overrides(h, name)]
            each = operator.call if name in _STRICT else _guarded
            setattr(self, name, partial(_each, fns, each) if fns else _nothing)
        for first, second in _PAIRED.items():
            users = [h for h in self.hooks if _overrides(h, first, second)]
            for name, half in ((first, _open), (second, _close)):
                fns = [getattr(h, name) for h in users]
                setattr(self, name, partial(half, fns) if fns else _nothing)

    def __repr__(self) -> str:
        return f"<HookChain {[type(h).__name__ for h in self.hooks]}>"

    def active(self) -> HookChain:
        """This chain without the hooks that switched themselves off since it was made."""
        return HookChain(self.hooks)

    def __add__(self, more: Iterable[Hooks]) -> HookChain:
        return HookChain((*self.hooks, *more))


def _overrides(hook: Hooks, *names: str) -> bool:
    return any(getattr(type(hook), name, None) is not getattr(Hooks, name) for name in names)


def _each(fns: _Calls, each: Callable[..., Any], *args: Any) -> None:
    for fn in fns:
        each(fn, *args)


def _open(fns: _Calls, subject: Any) -> list[Any]:
    return [_guarded(fn, subject) for fn in fns]


def _close(fns: _Calls, subject: Any, tokens: list[Any] | None, detail: Any) -> None:
    if tokens is not None:
        for fn, token in zip(fns, tokens, strict=True):
            _guarded(fn, subject, token, detail)


def _nothing(*args: Any) -> None: ...


def _guarded(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:
        _log.warning(
            "hook %s.%s failed (%s: %s); going on without it",
            type(getattr(fn, "__self__", fn)).__name__,
            getattr(fn, "__name__", "?"),
            type(exc).__name__,
            exc,
            exc_info=True,
        )
        return None
